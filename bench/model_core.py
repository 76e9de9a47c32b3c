"""Model-core benchmark on CPU fp32: routed vs blend-both-branches v2 layers, and generation speed.

    PYTHONPATH=src python bench/model_core.py [--quick]

(1) forward+backward tokens/s of EVEv2 decoder layers with modality experts, half the tokens
visual: our routed layers (each token through one branch) against the official way of computing
them (text and vision branch on every token, blended with the mask), implemented here;
(2) prefill and decode tokens/s of `eve_vlm.generate` on a random v2 model with one image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from eve_vlm.constants import IMAGE_TOKEN_INDEX
from eve_vlm.generate import GenerationConfig
from eve_vlm.generate.core import iter_generate
from eve_vlm.model import EveConfig, EveForCausalLM
from eve_vlm.model.decoder import DecoderLayer, ForwardContext, RotaryEmbedding, TokenRoute


def blend_layer(layer: DecoderLayer, x: Tensor, ctx: ForwardContext, m: Tensor) -> Tensor:
    """The official EVEv2 layer: f(x)(1 - m) + g(x) m for norms, q/k/v, o and MLP (both on all tokens)."""
    attn = layer.self_attn

    def mix(text: Tensor, vision: Tensor) -> Tensor:
        return text * (1 - m) + vision * m

    h = mix(layer.input_layernorm(x), layer.moe_input_layernorm(x))
    q = mix(attn.q_proj(h), attn.moe_q_proj(h))
    k = mix(attn.k_proj(h), attn.moe_k_proj(h))
    v = mix(attn.v_proj(h), attn.moe_v_proj(h))
    mixed = attn.attend(q, k, v, ctx)
    x = x + mix(attn.o_proj(mixed), attn.moe_o_proj(mixed))
    h = mix(layer.post_attention_layernorm(x), layer.moe_post_attention_layernorm(x))
    return x + mix(layer.mlp(h), layer.moe_mlp(h))


def _median_times(fns: list[Callable[[], None]], repeats: int) -> list[float]:
    """Median wall time of each function, run interleaved (so machine drift hits all alike)."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench_layers(hidden: int, mlp: int, layers: int, seq: int, batch: int, repeats: int) -> None:
    config = EveConfig(
        version="v2",
        family="qwen2",
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(hidden // 256, 1),
        attention_bias=True,
        modality_experts=True,
        patch_stride=16,
    )
    torch.manual_seed(0)
    stack = torch.nn.ModuleList(DecoderLayer(config, i) for i in range(layers))
    rope = RotaryEmbedding(config)
    x0 = torch.randn(batch, seq, hidden)
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    visual[:, seq // 4 : seq // 4 + seq // 2] = True  # half the tokens visual (one image mid-sequence)
    positions = torch.arange(seq).expand(batch, seq)
    cos, sin = rope(positions, x0.dtype)

    def routed() -> None:
        x = x0.clone().requires_grad_(True)
        ctx = ForwardContext(
            cos, sin, None, True, TokenRoute.from_mask(visual), None
        )  # routes built per step
        for layer in stack:
            x = layer(x, ctx)
        x.float().pow(2).mean().backward()

    m = visual[..., None].to(x0.dtype)

    def blended() -> None:
        x = x0.clone().requires_grad_(True)
        ctx = ForwardContext(cos, sin, None, True, None, None)
        for layer in stack:
            x = blend_layer(layer, x, ctx, m)
        x.float().pow(2).mean().backward()

    # Same function: the routed and blended layers agree (checked once, outside the timing).
    with torch.no_grad():
        ctx_r = ForwardContext(cos, sin, None, True, TokenRoute.from_mask(visual), None)
        ctx_b = ForwardContext(cos, sin, None, True, None, None)
        a, b = x0, x0
        for layer in stack:
            a, b = layer(a, ctx_r), blend_layer(layer, b, ctx_b, m)
        diff = (a - b).abs().max().item()

    tokens = batch * seq
    t_routed, t_blend = _median_times([routed, blended], repeats)
    print(
        f"[1] v2 decoder layers fwd+bwd, fp32 CPU: hidden {hidden}, MLP {mlp}, {layers} layers, "
        f"batch {batch} x seq {seq}, {int(visual.float().mean() * 100)}% visual (max |routed - blend| = {diff:.1e})"
    )
    print(f"    routed (ours)          {tokens / t_routed:10.0f} tokens/s  ({t_routed * 1e3:.0f} ms/step)")
    print(f"    blend both branches    {tokens / t_blend:10.0f} tokens/s  ({t_blend * 1e3:.0f} ms/step)")
    print(f"    speed-up               {t_blend / t_routed:10.2f}x")


def bench_generation(
    hidden: int, mlp: int, layers: int, vocab: int, image: int, prompt: int, new: int
) -> None:
    config = EveConfig(
        version="v2",
        family="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(hidden // 256, 1),
        attention_bias=True,
        modality_experts=True,
        vision_hidden_size=256,
        patch_stride=16,
    )
    torch.manual_seed(0)
    model = EveForCausalLM(config).eval()
    pixels = torch.randn(3, image, image)
    text = torch.randint(0, vocab, (prompt,))
    ids = torch.cat((text[: prompt // 2], torch.tensor([IMAGE_TOKEN_INDEX]), text[prompt // 2 :]))[None]
    grid = image // config.token_stride
    n_prefill = prompt + 1 + grid * (grid + 1)
    # eos -1 never matches: always `new` tokens
    gen_cfg = GenerationConfig(max_new_tokens=new, eos_token_id=[-1])

    def once() -> tuple[float, float, int]:
        steps = iter_generate(model, ids, [pixels], config=gen_cfg)
        start = time.perf_counter()
        next(steps)  # the prefill (and the first token's selection)
        t_prefill = time.perf_counter() - start
        n = 1
        start = time.perf_counter()
        for _ in steps:
            n += 1
        return t_prefill, time.perf_counter() - start, n - 1

    once()  # warm-up
    runs = [once() for _ in range(2)]
    t_prefill = statistics.median(r[0] for r in runs)
    t_decode = statistics.median(r[1] for r in runs)
    decoded = runs[0][2]
    print(
        f"[2] generation (eve_vlm.generate, KV cache, greedy), fp32 CPU: random v2 model, hidden {hidden}, "
        f"{layers} layers, vocab {vocab}; one {image}x{image} image + {prompt} text tokens = {n_prefill} prompt tokens"
    )
    print(f"    prefill                {n_prefill / t_prefill:10.0f} tokens/s  ({t_prefill * 1e3:.0f} ms)")
    print(
        f"    decode                 {decoded / t_decode:10.1f} tokens/s  ({decoded} tokens, {t_decode * 1e3:.0f} ms)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    if args.quick:
        bench_layers(hidden=256, mlp=704, layers=2, seq=256, batch=2, repeats=2)
        bench_generation(hidden=256, mlp=704, layers=2, vocab=4096, image=128, prompt=16, new=8)
    else:
        bench_layers(hidden=1024, mlp=2816, layers=4, seq=1024, batch=2, repeats=5)
        bench_generation(hidden=1024, mlp=2816, layers=8, vocab=32000, image=448, prompt=32, new=32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
