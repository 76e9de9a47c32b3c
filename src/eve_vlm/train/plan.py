"""`eve plan`: what a big run needs per GPU under FSDP2, before paying for the GPUs.

The parameter, gradient and optimizer shard sizes are measured, not estimated: the full-size model
is built on the meta device (no memory), sharded with the trainer's own FSDP2 wrapping under
PyTorch's fake process group of N ranks, and the local shard of every parameter is read. The
activations and the step time are estimates from the tensor shapes and the model's FLOPs at a
stated MFU; the docs say so next to every figure.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..model import EveConfig, EveForCausalLM, PatchAligningLayer
from ..processing.presets import released_geometry
from .distributed import fully_shard_model
from .params import set_trainable
from .recipe import Recipe

GIB = 2**30
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM
CLIP_L_WIDTH = 1024  # the v1 teacher (CLIP ViT-L/14-336)

# Decoder shapes of the released models' LLMs (their Hugging Face config.json).
LLM_SHAPES: dict[str, dict[str, Any]] = {
    "vicuna-7b": dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "qwen2.5-7b": dict(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, attention_bias=True),
    "qwen2.5-14b": dict(family="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, attention_bias=True),
}
MODELS = {"eve-7b": ("v1", "vicuna-7b"), "evev2-7b": ("v2", "qwen2.5-7b"), "evev2-14b": ("v2", "qwen2.5-14b")}


def model_config(name: str) -> EveConfig:
    """The full-size EveConfig of `name` (eve-7b, evev2-7b, evev2-14b)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    version, llm = MODELS[name]
    fields = {**LLM_SHAPES[llm], **released_geometry(version).model_fields(), "version": version}
    if version == "v2":
        fields["modality_experts"] = True
    return EveConfig(**fields)


@dataclass
class ShardSizes:
    """Elements held by one rank under FSDP2, and the model's totals."""

    world: int
    rank: int
    local_params: int
    local_trainable: int
    total_params: int
    total_trainable: int
    largest_unit: int  # full elements of the largest sharded unit (gathered during its forward)
    root_unit: int  # full elements of the root unit (embeddings, patch embedding, norm, head)


def meta_model(config: EveConfig, trainable: list[str], freeze: list[str]) -> EveForCausalLM:
    with torch.device("meta"):
        model = EveForCausalLM(config)
        if config.version == "v1":  # training attaches the aligning layer (its teacher is not sharded)
            model.model.vision_tower_compressor = PatchAligningLayer(
                config.hidden_size, CLIP_L_WIDTH, config.num_hidden_layers, config.aligning_layer_rate,
                config.aligning_num_heads)
    set_trainable(model, trainable, freeze)
    return model


def measure_shards(config: EveConfig, trainable: list[str], freeze: list[str], world: int, rank: int = 0) -> ShardSizes:
    """Shard the meta-device model for `world` ranks with FSDP2 under the fake process group and
    read rank `rank`'s local shards (rank 0 holds the largest ones: FSDP2 pads the last)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("eve plan builds its own fake process group: run it outside torchrun")
    model = meta_model(config, trainable, freeze)
    units = [model.model.layers[0]]
    if model.model.vision_tower_compressor is not None:
        units.append(model.model.vision_tower_compressor)
    largest = max(sum(p.numel() for p in u.parameters()) for u in units)
    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("model.layers.", "model.vision_tower_compressor.", "model.mm_projector.")))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        fully_shard_model(model, mesh=init_device_mesh("cpu", (world,)))
        local = trainable_local = total = total_trainable = 0
        for p in model.parameters():
            n = p.to_local().numel()
            local += n
            total += p.numel()
            if p.requires_grad:
                trainable_local += n
                total_trainable += p.numel()
    finally:
        dist.destroy_process_group()
    return ShardSizes(world, rank, local, trainable_local, total, total_trainable, largest, root)


def train_flops_per_token(config: EveConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward, no recompute): 6 x the parameters one
    token passes through (one route of a v2 layer) plus causal attention over `seq_len`."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f
    dense = layers * per_layer + config.vocab_size * d  # the head (embedding lookups are free)
    attention = layers * 2 * 2 * q * seq_len / 2  # QK^T and AV, causal
    return 6 * dense + 3 * attention


def activation_bytes(config: EveConfig, tokens_per_gpu: int, checkpointing: bool, bytes_per: int = 2) -> float:
    """Saved activations of one micro-batch (bf16): per layer its input, norms, q/k/v, attention
    output, residuals and the SwiGLU MLP's four intermediates; with checkpointing only each layer's
    input plus one layer recomputed in full. The head's logits are kept at supervised tokens only
    (counted as all of them, fp32)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    one_layer = tokens_per_gpu * (4 * d + q + 2 * kv + q + 4 * f) * bytes_per
    head = tokens_per_gpu * config.vocab_size * 4
    if checkpointing:
        return layers * tokens_per_gpu * d * bytes_per + one_layer + head
    return layers * one_layer + head


@dataclass
class Plan:
    model: str
    gpus: int
    micro_batch: int
    seq_len: int
    shards: ShardSizes
    params_gib: float
    grads_gib: float
    optim_gib: float
    gathered_gib: float
    act_gib: float
    act_ckpt_gib: float
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    gpu_memory_gib: float

    def total(self, checkpointing: bool) -> float:
        base = self.params_gib + self.grads_gib + self.optim_gib + self.gathered_gib
        return base + (self.act_ckpt_gib if checkpointing else self.act_gib)


def make_plan(recipe: Recipe, model: str, gpus: int, *, seq_len: int | None = None, gpu_memory_gib: float = 80.0,
              mfu: float = 0.4, peak_flops: float = H100_BF16_PEAK) -> Plan:
    if recipe.lora is not None:  # adapters train on one process or under DDP; the trainer refuses FSDP2 for them
        raise ValueError(
            f"recipe {recipe.name} trains LoRA adapters, which run on one process or with DDP, while eve plan "
            "sizes FSDP2 training; add --set lora=null to plan full fine-tuning (an upper bound)")
    config = model_config(model)
    trainable = list(recipe.trainable)
    if config.version == "v2" or recipe.teacher.kind == "none":
        trainable = [g for g in trainable if g != "aligner"]
    shards = measure_shards(config, trainable, list(recipe.freeze), gpus)
    seq = seq_len or recipe.data.max_length
    tokens = recipe.micro_batch_size * seq
    flops = train_flops_per_token(config, seq)
    step_tokens = recipe.global_batch_size * seq
    step_s = step_tokens * flops / (gpus * peak_flops * mfu)
    return Plan(
        model=model, gpus=gpus, micro_batch=recipe.micro_batch_size, seq_len=seq, shards=shards,
        params_gib=shards.local_params * 4 / GIB,  # fp32 master shards
        grads_gib=shards.local_trainable * 4 / GIB,  # fp32 gradient shards
        optim_gib=shards.local_trainable * 8 / GIB,  # AdamW: two fp32 moments
        gathered_gib=(2 * shards.largest_unit + shards.root_unit) * 2 / GIB,  # bf16: a unit, the next, the root
        act_gib=activation_bytes(config, tokens, False) / GIB,
        act_ckpt_gib=activation_bytes(config, tokens, True) / GIB,
        step_s=step_s, tokens_per_s_per_gpu=step_tokens / step_s / gpus, mfu=mfu, gpu_memory_gib=gpu_memory_gib,
    )


def format_plan(plan: Plan) -> str:
    s = plan.shards
    fit = {c: plan.total(c) <= plan.gpu_memory_gib * 0.9 for c in (False, True)}
    lines = [
        f"model {plan.model}: {s.total_params / 1e9:.2f}B parameters, {s.total_trainable / 1e9:.2f}B trained; "
        f"FSDP2 over {plan.gpus} GPUs (shards measured on the fake process group)",
        f"per GPU: parameters {plan.params_gib:.2f} GiB (fp32 shards), gradients {plan.grads_gib:.2f} GiB, "
        f"AdamW state {plan.optim_gib:.2f} GiB, gathered bf16 units {plan.gathered_gib:.2f} GiB",
        f"activations at micro-batch {plan.micro_batch} x {plan.seq_len} tokens (estimate): "
        f"{plan.act_gib:.1f} GiB without, {plan.act_ckpt_gib:.1f} GiB with activation checkpointing",
        f"total per GPU: {plan.total(False):.1f} GiB without, {plan.total(True):.1f} GiB with checkpointing; "
        f"fits {plan.gpu_memory_gib:.0f} GiB (90% usable): {'yes' if fit[False] else 'no'} / {'yes' if fit[True] else 'no'}",
        f"step time {plan.step_s:.2f} s, {plan.tokens_per_s_per_gpu:.0f} tokens/s per GPU at MFU {plan.mfu:.0%} "
        f"of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s (bf16)",
    ]
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '80' -> GiB."""
    t = text.strip().lower()
    for suffix, scale in (("gib", 1.0), ("gb", 1e9 / GIB), ("g", 1.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale
    return float(t)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-GPU memory and step time of a recipe under FSDP2, before renting the GPUs",
                       description="Shard the full-size model on the meta device with FSDP2 under a fake process "
                                   "group of N ranks and report the per-GPU memory and the expected step time.")
    p.add_argument("recipe", help="a shipped recipe (e.g. eve_v2/1_vision) or a YAML file")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (FSDP2 ranks)")
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="model size (default: eve-7b for v1 recipes, evev2-7b for v2)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (default 80GiB)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the recipe's data.max_length)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field before planning, e.g. --set micro_batch_size=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    recipe = Recipe.load(args.recipe, args.overrides)
    model = args.model or ("eve-7b" if recipe.model.version == "v1" else "evev2-7b")
    plan = make_plan(recipe, model, args.gpus, seq_len=args.seq_len, gpu_memory_gib=parse_memory(args.gpu_memory),
                     mfu=args.mfu)
    sys.stdout.write(format_plan(plan) + "\n")
    return 0
