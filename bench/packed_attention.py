"""What a packed row costs: padded rows vs packed rows with a dense mask vs per-document attention.

    PYTHONPATH=src python bench/packed_attention.py [--reps 5] [--flex]

One run on this machine, for an EVE v1 and an EVEv2 mid-size model (hidden 512, 8 layers, 8 heads,
4 key/value heads; v2 with its vision copies, so routing runs), fp32, of one mixed-aspect-ratio
batch: four samples with 448x448, 224x672, 672x224 and 320x480 images (v1: sides rounded to
multiples of 28) and 64 text tokens each (the last 24 supervised):

(a) padded: four rows, each padded to the longest;
(b) packed, dense: one row, the block-diagonal [L, L] mask through SDPA (``packed_attention="dense"``);
(c) packed, document attention: one row, the decoder's default (``auto``: one SDPA per document on CPU).

For each: forward + backward (the model's training forward: no logits, loss on the targets), and a
whole train step (+ AdamW). Then the attention core alone (SDPA or the packed entry point, forward +
backward, times the number of layers) of (a), (b), (c) against the sum of each sample's own causal
attention. Times are the best of --reps (the machine is shared: the best run is the one least
disturbed), the variants interleaved; ratios are within this one run.
``--flex`` adds the forward-only attention of compiled FlexAttention with a document block mask
(FlexAttention has no backward on CPU, so it cannot be the CPU training backend).
"""

from __future__ import annotations

import argparse
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


def interleaved(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Best ms of each callable over `reps`, one warm-up each, the variants alternating."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * min(v) for k, v in times.items()}


def step_fns(model: EveForCausalLM, samples) -> tuple[dict, dict, dict[str, int]]:
    """Forward+backward and whole-step callables of (a), (b), (c), and the spliced row lengths."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = {"a": ("auto", padded_batch(samples)), "b": ("dense", packed_batch(samples)),
               "c": ("auto", packed_batch(samples))}

    def fwd_bwd(key: str) -> None:
        backend, batch = batches[key]
        model.model.packed_attention = backend
        out = model(**batch, return_logits=False)
        out.lm_loss_sum.backward()

    def step(key: str) -> None:
        fwd_bwd(key)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad():
        model.model.packed_attention = "auto"
        lengths = model(**batches["a"][1], return_logits=False).valid.sum(1).tolist()
    shapes = {"rows (a)": len(lengths), "longest (a)": max(lengths), "packed row (c)": sum(lengths)}
    fb = {k: (lambda k=k: (model.zero_grad(set_to_none=True), fwd_bwd(k))) for k in batches}
    st = {k: (lambda k=k: step(k)) for k in batches}
    return fb, st, shapes | {"lengths": lengths}


def attention_fns(model: EveForCausalLM, lengths: list[int]) -> dict[str, Callable[[], None]]:
    """The attention core alone (forward + backward) x layers, on random q/k/v of the batch's shapes."""
    c = model.config
    h, kv, hd, n_layers = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_hidden_layers
    g = torch.Generator().manual_seed(0)

    def qkv(b: int, n: int):
        return (torch.randn(b, h, n, hd, generator=g, requires_grad=True),
                torch.randn(b, kv, n, hd, generator=g, requires_grad=True),
                torch.randn(b, kv, n, hd, generator=g, requires_grad=True))

    total, longest = sum(lengths), max(lengths)
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    pad_mask, _ = build_attention_mask(valid, None, None)
    seg = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))[None]
    dense = PackedLayout.from_segments(seg, torch.ones_like(seg, dtype=torch.bool), backend="dense")
    docs = PackedLayout.from_segments(seg, torch.ones_like(seg, dtype=torch.bool), backend="segments")
    a_in, p_in, s_in = qkv(len(lengths), longest), qkv(1, total), [qkv(1, n) for n in lengths]

    def run(fn) -> None:
        for _ in range(n_layers):
            fn().sum().backward()

    return {
        "a": lambda: run(lambda: F.scaled_dot_product_attention(*a_in, attn_mask=pad_mask, enable_gqa=True)),
        "b": lambda: run(lambda: dense.attend(*p_in)),
        "c": lambda: run(lambda: docs.attend(*p_in)),
        "per-sample sum": lambda: [run(lambda x=x: F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True))
                                   for x in s_in],
    }


def flex_forward(model: EveForCausalLM, lengths: list[int], reps: int) -> dict[str, float]:
    """Forward-only attention x layers: per-document SDPA vs compiled FlexAttention (block mask)."""
    c = model.config
    seg = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))[None]
    ones = torch.ones_like(seg, dtype=torch.bool)
    q = torch.randn(1, c.num_attention_heads, seg.shape[1], c.head_dim)
    k = torch.randn(1, c.num_key_value_heads, seg.shape[1], c.head_dim)
    v = torch.randn_like(k)
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    from torch.nn.attention.flex_attention import create_block_mask

    doc = seg[0]
    block_mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (ki <= qi), 1, None,
                                   seg.shape[1], seg.shape[1], device="cpu")
    docs = PackedLayout.from_segments(seg, ones, backend="segments")
    t0 = time.perf_counter()
    with torch.no_grad():
        flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        compile_s = time.perf_counter() - t0
        fns = {"segments fwd": lambda: [docs.attend(q, k, v) for _ in range(c.num_hidden_layers)],
               "flex fwd": lambda: [flex(q, k, v, block_mask=block_mask, enable_gqa=True)
                                    for _ in range(c.num_hidden_layers)]}
        out = interleaved(fns, reps)
    return out | {"flex compile s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--flex", action="store_true", help="also time compiled FlexAttention, forward only")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; "
          f"EVE mid-size: hidden {args.hidden}, {args.layers} layers")
    for version in ("v1", "v2"):
        model = build_model(version, args.hidden, args.layers)
        samples = make_samples(model.config.token_stride)
        fb, st, shapes = step_fns(model, samples)
        lengths = shapes.pop("lengths")
        fb_ms, st_ms = interleaved(fb, args.reps), interleaved(st, args.reps)
        at_ms = interleaved(attention_fns(model, lengths), args.reps)
        waste = 1 - sum(lengths) / (len(lengths) * max(lengths))
        print(f"\n{version}: samples of {lengths} spliced tokens; padded rows waste {waste:.0%}")
        print("| variant | fwd+bwd ms | train step ms | attention ms (fwd+bwd, all layers) |")
        print("|---|---|---|---|")
        names = {"a": "(a) padded rows", "b": "(b) packed, dense mask", "c": "(c) packed, document attention"}
        for k, name in names.items():
            print(f"| {name} | {fb_ms[k]:.0f} | {st_ms[k]:.0f} | {at_ms[k]:.0f} |")
        print(f"| sum of per-sample attention | | | {at_ms['per-sample sum']:.0f} |")
        print(f"step (c) vs (a): {st_ms['a'] / st_ms['c']:.2f}x faster; vs (b): {st_ms['b'] / st_ms['c']:.2f}x; "
              f"fwd+bwd (c) vs (a): {fb_ms['a'] / fb_ms['c']:.2f}x, vs (b): {fb_ms['b'] / fb_ms['c']:.2f}x")
        print(f"attention (c) / per-sample sum: {at_ms['c'] / at_ms['per-sample sum']:.2f}x; "
              f"(b) / per-sample sum: {at_ms['b'] / at_ms['per-sample sum']:.2f}x")
        if args.flex:
            fx = flex_forward(model, lengths, args.reps)
            print(f"forward-only attention, all layers: segments {fx['segments fwd']:.1f} ms, compiled flex "
                  f"{fx['flex fwd']:.1f} ms (compiled in {fx['flex compile s']:.0f} s)")


if __name__ == "__main__":
    main()
