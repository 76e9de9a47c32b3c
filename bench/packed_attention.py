"""What a packed row costs: padded rows vs packed rows with a dense mask vs per-document attention.

    PYTHONPATH=src python bench/packed_attention.py [--reps 7] [--threads 1] [--versions v2,v1] [--flex]

One run on this machine, for an EVEv2 and an EVE v1 mid-size model (hidden 512, 8 layers, 8 heads,
4 key/value heads; v2 with its vision copies, so routing runs), fp32, of one mixed-aspect-ratio
batch: four samples with 448x448, 224x672, 672x224 and 320x480 images (v1: sides rounded to
multiples of 28) and 64 text tokens each (the last 24 supervised):

(a) padded: four rows, each padded to the longest;
(b) packed, dense: one row, the block-diagonal [L, L] mask through SDPA (``packed_attention="dense"``);
(c) packed, document attention: one row, the decoder's default (``auto``: one SDPA per document on CPU).

For each, a whole train step (the model's training forward: no logits, loss on the targets;
backward; AdamW), timed as forward + backward and optimizer. Then the attention core alone (SDPA
or the packed entry point, forward + backward, times the number of layers) of (a), (b), (c)
against the sum of each sample's own causal attention.

Robust on a shared, noisy machine: the variants run interleaved (their order rotates every
repeat), each figure is the median over --reps, and the ratios are medians of the per-repeat
ratios (each repeat compares variants that ran seconds apart), then again as ratios of the
medians (a repeat that another job stalled skews its paired ratios but not the medians).
`--threads 1` (the default) because two OpenMP threads on two cores that other jobs share stall
each other, which swamps the ratios.
``--flex`` adds the attention core with compiled FlexAttention (document block mask), forward and,
where this torch can, backward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.model import EveConfig, EveForCausalLM
from eve_vlm.model.attention import PackedLayout
from eve_vlm.model.decoder import build_attention_mask

SIZES = [(448, 448), (224, 672), (672, 224), (320, 480)]
TEXT, SUPERVISED, BEFORE_IMAGE = 64, 24, 8


def build_model(version: str, hidden: int, layers: int) -> EveForCausalLM:
    cfg = EveConfig(
        version=version, family="qwen2" if version == "v2" else "llama", vocab_size=1024,
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
        vision_hidden_size=hidden, patch_stride=16 if version == "v2" else 14, merge_stride=2,
        modality_experts=version == "v2", attention_bias=version == "v2", max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    return EveForCausalLM(cfg).train()


def make_samples(stride: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, labels, image) per sample; image sides rounded to the model's token stride."""
    g = torch.Generator().manual_seed(0)
    out = []
    for h, w in SIZES:
        h, w = max(stride, round(h / stride) * stride), max(stride, round(w / stride) * stride)
        text = torch.randint(3, 1000, (TEXT,), generator=g)
        ids = torch.cat([text[:BEFORE_IMAGE], torch.tensor([IMAGE_TOKEN_INDEX]), text[BEFORE_IMAGE:]])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-SUPERVISED:] = ids[-SUPERVISED:]
        out.append((ids, labels, torch.randn(3, h, w, generator=g)))
    return out


def padded_batch(samples) -> dict:
    width = max(s[0].numel() for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for r, (i, lab, _) in enumerate(samples):
        ids[r, : i.numel()], labels[r, : i.numel()], mask[r, : i.numel()] = i, lab, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": [s[2] for s in samples]}


def packed_batch(samples) -> dict:
    ids = torch.cat([s[0] for s in samples])[None]
    segs = torch.cat([torch.full_like(s[0], k + 1) for k, s in enumerate(samples)])[None]
    return {"input_ids": ids, "labels": torch.cat([s[1] for s in samples])[None], "segment_ids": segs,
            "images": [s[2] for s in samples]}


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Per callable, its ms in each repeat (after one warm-up each); the order rotates every repeat."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(1000 * (time.perf_counter() - t0))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median over repeats of times[num] / times[den] (the two ran within one repeat)."""
    return median([a / b for a, b in zip(times[num], times[den], strict=True)])


class StepTimer:
    """Whole train steps of (a), (b), (c), each timed as forward + backward and the optimizer step."""

    def __init__(self, model: EveForCausalLM, samples) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        self.batches = {"a": ("auto", padded_batch(samples)), "b": ("dense", packed_batch(samples)),
                        "c": ("auto", packed_batch(samples))}
        self.fwd_bwd: dict[str, list[float]] = {k: [] for k in self.batches}
        with torch.no_grad():
            model.model.packed_attention = "auto"
            self.lengths = model(**self.batches["a"][1], return_logits=False).valid.sum(1).tolist()

    def step(self, key: str) -> None:
        backend, batch = self.batches[key]
        self.model.model.packed_attention = backend
        t0 = time.perf_counter()
        self.model(**batch, return_logits=False).lm_loss_sum.backward()
        self.fwd_bwd[key].append(1000 * (time.perf_counter() - t0))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, reps: int) -> dict[str, list[float]]:
        steps = interleaved({k: (lambda k=k: self.step(k)) for k in self.batches}, reps)
        for k in self.fwd_bwd:  # drop the warm-up
            self.fwd_bwd[k] = self.fwd_bwd[k][1:]
        return steps


def qkv_of(model: EveForCausalLM, b: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random q, k, v as the decoder makes them: [B, L, heads, hd] memory, viewed [B, heads, L, hd]."""
    c = model.config

    def one(heads: int) -> torch.Tensor:
        return torch.randn(b, n, heads, c.head_dim, generator=g).transpose(1, 2).requires_grad_()

    return one(c.num_attention_heads), one(c.num_key_value_heads), one(c.num_key_value_heads)


def attention_fns(model: EveForCausalLM, lengths: list[int]) -> dict[str, Callable[[], None]]:
    """The attention core alone (forward + backward) x layers, on random q/k/v of the batch's shapes."""
    n_layers = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    total, longest = sum(lengths), max(lengths)
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    pad_mask, _ = build_attention_mask(valid, None, None)
    seg = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))[None]
    ones = torch.ones_like(seg, dtype=torch.bool)
    dense = PackedLayout.from_segments(seg, ones, backend="dense")
    docs = PackedLayout.from_segments(seg, ones, backend="segments")
    a_in, p_in = qkv_of(model, len(lengths), longest, g), qkv_of(model, 1, total, g)
    s_in = [qkv_of(model, 1, n, g) for n in lengths]

    def run(fn: Callable[[], torch.Tensor]) -> None:
        for _ in range(n_layers):
            fn().sum().backward()

    return {
        "a": lambda: run(lambda: F.scaled_dot_product_attention(*a_in, attn_mask=pad_mask, enable_gqa=True)),
        "b": lambda: run(lambda: dense.attend(*p_in)),
        "c": lambda: run(lambda: docs.attend(*p_in)),
        "sum": lambda: [run(lambda x=x: F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True))
                        for x in s_in],
    }


def flex_fns(model: EveForCausalLM, lengths: list[int]) -> tuple[dict[str, Callable[[], None]], str]:
    """Compiled FlexAttention (document block mask) x layers, forward + backward where it runs on
    this device, else forward only; next to per-document SDPA doing the same."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_layers = model.config.num_hidden_layers
    seg = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))[None]
    doc, n = seg[0], seg.shape[1]
    block_mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (ki <= qi), 1, None, n, n,
                                   device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    docs = PackedLayout.from_segments(seg, torch.ones_like(seg, dtype=torch.bool), backend="segments")
    q, k, v = qkv_of(model, 1, n, torch.Generator().manual_seed(0))
    mode = "forward + backward"
    try:
        # probed uncompiled: a compiled function that raised once falls back to eager for good
        flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True).sum().backward()
    except Exception as e:  # noqa: BLE001 - report whatever stops it, then time forward only
        mode = f"forward only ({type(e).__name__}: {str(e).split('.')[0]})"
        q, k, v = (t.detach().clone() for t in (q, k, v))  # not views of grad-requiring tensors

    def run(fn: Callable[[], torch.Tensor]) -> None:
        for _ in range(n_layers):
            out = fn()
            if mode == "forward + backward":
                out.sum().backward()

    ctx = torch.enable_grad if mode == "forward + backward" else torch.no_grad

    def under(fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            with ctx():
                fn()
        return call

    under(lambda: run(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)))()  # compile for this mode

    return {"segments": under(lambda: run(lambda: docs.attend(q, k, v))),
            "flex": under(lambda: run(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)))}, mode


def profile_steps(model: EveForCausalLM, timer: StepTimer, top: int) -> None:
    """Where one train step of (a) and of (c) spends its time: self CPU time per op, top first."""
    from torch.profiler import ProfilerActivity, profile

    for key in ("a", "c"):
        timer.step(key)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            timer.step(key)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1000
        print(f"profile of one step ({key}), {total:.0f} ms of self CPU time in ops; top {top}:")
        for e in events[:top]:
            print(f"  {e.key:<48} {e.self_cpu_time_total / 1000:8.1f} ms  {e.count:6d} calls")


def report(version: str, model: EveForCausalLM, args: argparse.Namespace) -> None:
    samples = make_samples(model.config.token_stride)
    timer = StepTimer(model, samples)
    lengths = timer.lengths
    steps = timer.run(args.reps)
    fb = timer.fwd_bwd
    attn = interleaved(attention_fns(model, lengths), args.reps)
    waste = 1 - sum(lengths) / (len(lengths) * max(lengths))
    print(f"\n{version}: samples of {lengths} spliced tokens (one packed row of {sum(lengths)}); "
          f"padded rows waste {waste:.0%}; medians of {args.reps} interleaved repeats")
    print(f"| {version} variant | train step ms | of which fwd+bwd ms | attention ms (fwd+bwd, "
          f"{model.config.num_hidden_layers} layers) |")
    print("|---|---|---|---|")
    names = {"a": "(a) padded rows", "b": "(b) packed, dense mask", "c": "(c) packed, document attention"}
    for k, name in names.items():
        print(f"| {name} | {median(steps[k]):.0f} | {median(fb[k]):.0f} | {median(attn[k]):.0f} |")
    print(f"| sum of per-sample attention | | | {median(attn['sum']):.0f} |")
    print(f"{version} train step (c) vs (a): {paired(steps, 'a', 'c'):.2f}x faster, vs (b): "
          f"{paired(steps, 'b', 'c'):.2f}x; fwd+bwd (c) vs (a): {paired(fb, 'a', 'c'):.2f}x, "
          f"vs (b): {paired(fb, 'b', 'c'):.2f}x")
    print(f"{version} attention (c) / per-sample sum: {paired(attn, 'c', 'sum'):.2f}x; "
          f"(a): {paired(attn, 'a', 'sum'):.2f}x; (b): {paired(attn, 'b', 'sum'):.2f}x")
    # a repeat that another job stalled skews its paired ratio; the ratio of medians does not see it
    print(f"{version} the same as ratios of the medians: step (c) vs (a) "
          f"{median(steps['a']) / median(steps['c']):.2f}x, vs (b) {median(steps['b']) / median(steps['c']):.2f}x; "
          f"attention (c) / per-sample sum {median(attn['c']) / median(attn['sum']):.2f}x", flush=True)
    if args.profile:
        profile_steps(model, timer, args.profile)
    if args.flex:
        t0 = time.perf_counter()
        fns, mode = flex_fns(model, lengths)
        compile_s = time.perf_counter() - t0
        fx = interleaved(fns, args.reps)
        print(f"{version} attention core, {mode}, all layers: per-document SDPA {median(fx['segments']):.0f} ms, "
              f"compiled FlexAttention {median(fx['flex']):.0f} ms (flex / segments "
              f"{paired(fx, 'flex', 'segments'):.2f}x; compiled in {compile_s:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--versions", default="v2,v1", help="comma-separated: v1, v2")
    ap.add_argument("--flex", action="store_true", help="also time compiled FlexAttention")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N ops with the most self CPU time in one step of (a) and of (c)")
    args = ap.parse_args()
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if not versions or any(v not in ("v1", "v2") for v in versions):
        ap.error(f"--versions takes v1 and/or v2, got {args.versions!r}")
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; "
          f"EVE mid-size: hidden {args.hidden}, {args.layers} layers", flush=True)
    for version in versions:
        report(version, build_model(version, args.hidden, args.layers), args)


if __name__ == "__main__":
    main()
