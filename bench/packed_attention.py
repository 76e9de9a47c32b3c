"""What a packed row costs: padded rows vs packed rows with a dense mask vs per-document attention.

    PYTHONPATH=src python bench/packed_attention.py [--reps 7] [--threads 1] [--versions v2,v1] [--flex]
                                                    [--copies K] [--device cuda --dtype bf16]

One run on this machine, for an EVEv2 and an EVE v1 mid-size model (hidden 512, 8 layers, 8 heads,
4 key/value heads; v2 with its vision copies, so routing runs), fp32 by default, of one mixed-aspect-ratio
batch: four samples with 448x448, 224x672, 672x224 and 320x480 images (v1: sides rounded to
multiples of 28) and 64 text tokens each (the last 24 supervised):

(a) padded: four rows, each padded to the longest;
(b) packed, dense: one row, the block-diagonal [L, L] mask through SDPA (``packed_attention="dense"``);
(c) packed, document attention: one row, the decoder's default (``auto``: one SDPA per document on
    CPU, FlexAttention with a document block mask on CUDA; there the per-document SDPA runs too).

``--device cuda --dtype bf16`` runs it as the trainer trains on a GPU: fp32 weights under bf16
autocast, times taken after a device synchronize.

``--copies K`` puts K such mixes (other random pixels and text) in the batch: 4K padded rows, or
one packed row K times as long, as the released v2 recipes pack (2048-5000 tokens a row).

For each, a whole train step (the model's training forward: no logits, loss on the targets;
backward; AdamW as the trainer builds it), timed as forward + backward and optimizer. Then the
attention core alone (SDPA or the packed entry point, forward + backward, times the number of
layers) of (a), (b), (c) against the sum of each sample's own causal attention.

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
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.model import EveConfig, EveForCausalLM
from eve_vlm.model.attention import PackedLayout, resolve_backend
from eve_vlm.model.decoder import build_attention_mask
from eve_vlm.train.params import build_optimizer
from eve_vlm.train.recipe import OptimSpec

SIZES = [(448, 448), (224, 672), (672, 224), (320, 480)]
TEXT, SUPERVISED, BEFORE_IMAGE = 64, 24, 8


class Run:
    """Where and in what precision the bench runs: a device, and an autocast dtype or None (fp32)."""

    def __init__(self, device: str, dtype: str) -> None:
        self.device = torch.device(device)
        self.amp = {"fp32": None, "bf16": torch.bfloat16}[dtype]

    @property
    def dtype(self) -> torch.dtype:
        """What the attention core's q/k/v are in: what autocast makes of the projections."""
        return self.amp or torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to(self, batch: dict) -> dict:
        return {k: [t.to(self.device) for t in v] if isinstance(v, list) else v.to(self.device)
                for k, v in batch.items()}


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


def make_samples(stride: int, copies: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, labels, image) per sample, `copies` times the four sizes; image sides rounded to
    the model's token stride."""
    g = torch.Generator().manual_seed(0)
    out = []
    for h, w in SIZES * copies:
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


def interleaved(fns: dict[str, Callable[[], object]], reps: int, run: Run) -> dict[str, list[float]]:
    """Per callable, its ms in each repeat (after one warm-up each); the order rotates every repeat."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            run.sync()
            t0 = time.perf_counter()
            fns[k]()
            run.sync()
            times[k].append(1000 * (time.perf_counter() - t0))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median over repeats of times[num] / times[den] (the two ran within one repeat)."""
    return median([a / b for a, b in zip(times[num], times[den], strict=True)])


class StepTimer:
    """Whole train steps of (a), (b), (c), each timed as forward + backward and the optimizer step.
    Where `auto` is not per-document SDPA (CUDA), (s) runs that too."""

    def __init__(self, model: EveForCausalLM, samples, run: Run) -> None:
        self.model, self.where = model.to(run.device), run
        self.opt = build_optimizer({"all": list(model.parameters())}, OptimSpec(lr=1e-6), run.device)
        padded, packed = run.to(padded_batch(samples)), run.to(packed_batch(samples))
        self.batches = {"a": ("auto", padded), "b": ("dense", packed), "c": ("auto", packed)}
        self.backend = resolve_backend("auto", run.device)
        if self.backend != "segments":
            self.batches["s"] = ("segments", packed)
        self.fwd_bwd: dict[str, list[float]] = {k: [] for k in self.batches}
        with torch.no_grad(), run.autocast():
            model.model.packed_attention = "auto"
            self.lengths = model(**padded, return_logits=False).valid.sum(1).tolist()

    def step(self, key: str) -> None:
        backend, batch = self.batches[key]
        self.model.model.packed_attention = backend
        t0 = time.perf_counter()
        with self.where.autocast():
            loss = self.model(**batch, return_logits=False).lm_loss_sum
        loss.backward()
        self.where.sync()
        self.fwd_bwd[key].append(1000 * (time.perf_counter() - t0))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, reps: int) -> dict[str, list[float]]:
        steps = interleaved({k: (lambda k=k: self.step(k)) for k in self.batches}, reps, self.where)
        for k in self.fwd_bwd:  # drop the warm-up
            self.fwd_bwd[k] = self.fwd_bwd[k][1:]
        return steps


def qkv_of(model: EveForCausalLM, b: int, n: int, g: torch.Generator, run: Run) -> tuple[torch.Tensor, ...]:
    """Random q, k, v as the decoder makes them: [B, L, heads, hd] memory, viewed [B, heads, L, hd]."""
    c = model.config

    def one(heads: int) -> torch.Tensor:
        x = torch.randn(b, n, heads, c.head_dim, generator=g).to(run.device, run.dtype)
        return x.transpose(1, 2).requires_grad_()

    return one(c.num_attention_heads), one(c.num_key_value_heads), one(c.num_key_value_heads)


def segment_ids(lengths: list[int], run: Run) -> torch.Tensor:
    """[1, sum(lengths)] document ids 1, 2, ... of one packed row."""
    return torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))[None].to(run.device)


def attention_fns(model: EveForCausalLM, lengths: list[int], run: Run) -> dict[str, Callable[[], None]]:
    """The attention core alone (forward + backward) x layers, on random q/k/v of the batch's shapes:
    (c) with the backend `auto` picks here, and (s) per-document SDPA where that is another one."""
    n_layers = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    total, longest = sum(lengths), max(lengths)
    valid = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(run.device)
    pad_mask, _ = build_attention_mask(valid, None, None)
    seg = segment_ids(lengths, run)
    ones = torch.ones_like(seg, dtype=torch.bool)
    layouts = {"b": "dense", "c": resolve_backend("auto", run.device)}
    if layouts["c"] != "segments":
        layouts["s"] = "segments"
    layouts = {k: PackedLayout.from_segments(seg, ones, backend=b) for k, b in layouts.items()}
    a_in, p_in = qkv_of(model, len(lengths), longest, g, run), qkv_of(model, 1, total, g, run)
    s_in = [qkv_of(model, 1, n, g, run) for n in lengths]

    def every_layer(fn: Callable[[], torch.Tensor]) -> None:
        for _ in range(n_layers):
            fn().float().sum().backward()

    return {
        "a": lambda: every_layer(lambda: F.scaled_dot_product_attention(*a_in, attn_mask=pad_mask, enable_gqa=True)),
        **{k: (lambda lay=lay: every_layer(lambda: lay.attend(*p_in))) for k, lay in layouts.items()},
        "sum": lambda: [every_layer(lambda x=x: F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True))
                        for x in s_in],
    }


def flex_fns(model: EveForCausalLM, lengths: list[int], run: Run) -> tuple[dict[str, Callable[[], None]], str]:
    """Compiled FlexAttention (document block mask) x layers, forward + backward where it runs on
    this device, else forward only; next to per-document SDPA doing the same."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_layers = model.config.num_hidden_layers
    seg = segment_ids(lengths, run)
    doc, n = seg[0], seg.shape[1]
    block_mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (ki <= qi), 1, None, n, n,
                                   device=run.device)
    flex = torch.compile(flex_attention, dynamic=False)
    docs = PackedLayout.from_segments(seg, torch.ones_like(seg, dtype=torch.bool), backend="segments")
    q, k, v = qkv_of(model, 1, n, torch.Generator().manual_seed(0), run)
    mode = "forward + backward"
    try:
        # probed uncompiled: a compiled function that raised once falls back to eager for good
        flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True).float().sum().backward()
    except Exception as e:  # noqa: BLE001 - report whatever stops it, then time forward only
        mode = f"forward only ({type(e).__name__}: {str(e).split('.')[0]})"
        q, k, v = (t.detach().clone() for t in (q, k, v))  # not views of grad-requiring tensors

    def every_layer(fn: Callable[[], torch.Tensor]) -> None:
        for _ in range(n_layers):
            out = fn()
            if mode == "forward + backward":
                out.float().sum().backward()

    ctx = torch.enable_grad if mode == "forward + backward" else torch.no_grad

    def under(fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            with ctx():
                fn()
        return call

    under(lambda: every_layer(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)))()  # compile for this mode

    return {"segments": under(lambda: every_layer(lambda: docs.attend(q, k, v))),
            "flex": under(lambda: every_layer(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)))}, mode


def profile_steps(model: EveForCausalLM, timer: StepTimer, top: int) -> None:
    """Where one train step of (a) and of (c) spends its time: self time per op on the device that
    runs it (CPU, or the GPU's kernels), top first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = timer.where.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    where = "self_device_time_total" if cuda else "self_cpu_time_total"
    for key in ("a", "c"):
        timer.step(key)  # warm
        with profile(activities=activities) as prof:
            timer.step(key)
            timer.where.sync()
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, where), reverse=True)
        total = sum(getattr(e, where) for e in events) / 1000
        print(f"profile of one step ({key}), {total:.0f} ms of self {'GPU' if cuda else 'CPU'} time in ops; top {top}:")
        for e in events[:top]:
            print(f"  {e.key[:48]:<48} {getattr(e, where) / 1000:8.1f} ms  {e.count:6d} calls")


def report(version: str, model: EveForCausalLM, args: argparse.Namespace, run: Run) -> None:
    samples = make_samples(model.config.token_stride, args.copies)
    timer = StepTimer(model, samples, run)
    lengths = timer.lengths
    steps = timer.run(args.reps)
    fb = timer.fwd_bwd
    attn = interleaved(attention_fns(model, lengths, run), args.reps, run)
    waste = 1 - sum(lengths) / (len(lengths) * max(lengths))
    print(f"\n{version}: samples of {lengths} spliced tokens (one packed row of {sum(lengths)}); "
          f"padded rows waste {waste:.0%}; medians of {args.reps} interleaved repeats")
    print(f"| {version} variant | train step ms | of which fwd+bwd ms | attention ms (fwd+bwd, "
          f"{model.config.num_hidden_layers} layers) |")
    print("|---|---|---|---|")
    names = {"a": "(a) padded rows", "b": "(b) packed, dense mask",
             "c": f"(c) packed, document attention ({timer.backend})", "s": "(s) packed, per-document SDPA"}
    for k, name in names.items():
        if k in steps:
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
    if "s" in steps:
        print(f"{version} train step (c) vs (s): {paired(steps, 's', 'c'):.2f}x faster; attention (s) / "
              f"per-sample sum: {paired(attn, 's', 'sum'):.2f}x", flush=True)
    if args.profile:
        profile_steps(model, timer, args.profile)
    if args.flex:
        t0 = time.perf_counter()
        fns, mode = flex_fns(model, lengths, run)
        compile_s = time.perf_counter() - t0
        fx = interleaved(fns, args.reps, run)
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
    ap.add_argument("--copies", type=int, default=1, metavar="K",
                    help="K mixes of the four sizes: 4K padded rows or one packed row of 4K samples")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: fp32 weights under bf16 autocast, as the trainer on a GPU")
    ap.add_argument("--flex", action="store_true", help="also time compiled FlexAttention")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N ops with the most self CPU time in one step of (a) and of (c)")
    args = ap.parse_args()
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if not versions or any(v not in ("v1", "v2") for v in versions):
        ap.error(f"--versions takes v1 and/or v2, got {args.versions!r}")
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.copies < 1:
        ap.error("--copies must be at least 1")
    run = Run(args.device, args.dtype)
    if run.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but this torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}; "
          f"EVE mid-size: hidden {args.hidden}, {args.layers} layers", flush=True)
    for version in versions:
        report(version, build_model(version, args.hidden, args.layers), args, run)


if __name__ == "__main__":
    main()
