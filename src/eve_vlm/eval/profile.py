"""FLOPs, parameter counts and latency of the vision part and the LLM part of an EVE model.

FLOPs are counted analytically, layer by layer, from the config and the token counts the processor
produces for an image size; parameters are counted on a model built on the ``meta`` device, so the
released 7B configs cost no memory. Counting convention (``Convention``):

* only matrix products count (linear layers, convolutions, attention scores ``QK^T`` and the
  weighted sum ``AV``); norms, activations, softmax, RoPE, biases and embedding lookups are free;
* one multiply-accumulate (MAC) = ``flops_per_mac`` FLOPs (2 by default, as
  ``torch.utils.flop_counter.FlopCounterMode`` counts);
* attention is counted over the full ``L x L`` score matrix (``dense``, what a dense kernel and
  ``FlopCounterMode`` count), the lower triangle only (``causal``), or not at all (``none``);
* the lm_head runs on every position (``all``, a training/scoring forward), the last one (``last``,
  a generation prefill) or is left out (``none``);
* routing EVEv2's modality experts sends each token through one branch, so the vision copies add
  parameters but no FLOPs; the official blend-both-branches forward is reported separately.

``PAPER`` is the convention that reproduces the EVE paper's efficiency table; docs/profile.md
explains how it was found and where it departs from ``STANDARD``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..constants import IMAGE_TOKEN_INDEX
from ..model.config import EveConfig
from ..model.eve import EveForCausalLM
from ..processing.images import EveImageConfig, num_image_tokens_for_size, pixel_size
from ..processing.presets import DEFAULT_PRESET, released_geometry, resolve_image_config
from ..runtime import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

AttentionCount = Literal["dense", "causal", "none"]
HeadCount = Literal["all", "last", "none"]


@dataclass(frozen=True)
class Convention:
    """How FLOPs are counted (see the module docstring)."""

    name: str = "standard"
    vision_flops_per_mac: int = 2
    llm_flops_per_mac: int = 2
    attention: AttentionCount = "dense"  # LLM self-attention (vision attention is always dense)
    lm_head: HeadCount = "all"
    # "all": every visual token the LLM sees (CLS + grid + SPLIT); "grid": the h*w grid tokens only.
    llm_visual_tokens: Literal["all", "grid"] = "all"


STANDARD = Convention()
# The EVE paper's table: vision at 2 FLOPs/MAC; LLM = 4 FLOPs/MAC x linear layers incl. lm_head
# over the h*w grid tokens. 4 instead of 2 is the paper's, not ours: see docs/profile.md.
PAPER = Convention(
    name="paper", llm_flops_per_mac=4, attention="none", lm_head="all", llm_visual_tokens="grid"
)
CONVENTIONS = {c.name: c for c in (STANDARD, PAPER)}


# ---------------------------------------------------------------------------------------------
# targets: what is profiled


@dataclass(frozen=True)
class ClipVisionSpec:
    """A CLIP ViT vision tower plus LLaVA's projector (the encoder-based reference row)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    projector_depth: int = 2  # mlp2x_gelu

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ProfileTarget:
    """A model to profile: the decoder config and the vision part (EVE embedding or CLIP)."""

    name: str
    description: str
    config: EveConfig
    image_config: EveImageConfig | None = None  # EVE models: the processor geometry
    clip: ClipVisionSpec | None = None  # encoder-based reference (LLaVA)

    @property
    def default_image_size(self) -> tuple[int, int]:
        """A square image at the model's native resolution (no padding, all tokens used)."""
        if self.clip is not None:
            return self.clip.image_size, self.clip.image_size
        cfg = self.image_config
        assert cfg is not None
        side = cfg.image_size if cfg.version == "v1" else cfg.max_size
        return int(side), int(side)


def _vicuna_7b(preset: str) -> EveConfig:
    """Vicuna-7B's decoder with the vision geometry of a released preset."""
    geometry = released_geometry(preset)
    return EveConfig(
        version=geometry.version,
        family="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        **geometry.model_fields(),
        vision_num_heads=8,
        projector_type="mlp2x_gelu",
    )


def _qwen25_7b_eve_v2(preset: str) -> EveConfig:
    """Qwen2.5-7B's decoder with modality experts and the vision geometry of a released preset."""
    geometry = released_geometry(preset)
    return EveConfig(
        version=geometry.version,
        family="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        attention_bias=True,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=32768,
        **geometry.model_fields(),
        modality_experts=True,
    )


def _released(name: str, description: str, config: EveConfig, preset: str) -> ProfileTarget:
    return ProfileTarget(name, description, config, released_geometry(preset).image_config())


def builtin_targets() -> dict[str, ProfileTarget]:
    """The released 7B models and the LLaVA-1.5 reference row.

    Decoders are the released LLMs' (Vicuna-7B for v1 and LLaVA, Qwen2.5-7B for v2); the vision
    geometry comes from the released-geometry table.
    """
    v1, v1_hd, v2_hd = "eve-patch14-anypixel-672", "eve-patch14-anypixel-1344", "eve-anyratio-res1600-patch16"
    return {
        "eve-7b-v1": _released("eve-7b-v1", "EVE-7B (v1, Vicuna-7B, 672 px)", _vicuna_7b(v1), v1),
        "eve-7b-hd-v1": _released("eve-7b-hd-v1", "EVE-7B-HD (v1, Vicuna-7B, 1344 px)", _vicuna_7b(v1_hd), v1_hd),
        "eve-7b-hd-v2": _released(
            "eve-7b-hd-v2",
            "EVEv2-7B-HD (Qwen2.5-7B, modality experts, max_size 1600)",
            _qwen25_7b_eve_v2(v2_hd),
            v2_hd,
        ),
        "llava-1.5-7b": ProfileTarget(
            "llava-1.5-7b",
            "LLaVA-1.5-7B (CLIP ViT-L/14-336 + mlp2x_gelu projector + Vicuna-7B)",
            _vicuna_7b(v1),
            clip=ClipVisionSpec(),
        ),
    }


def load_target(name_or_path: str) -> ProfileTarget:
    """A built-in name, a checkpoint folder (config.json + image config) or a config.json file."""
    targets = builtin_targets()
    if name_or_path in targets:
        return targets[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        folder, data = path.parent, json.loads(path.read_text())
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        folder, data = path, json.loads((path / "config.json").read_text())
    else:
        raise ValueError(
            f"unknown config {name_or_path!r}: not a built-in name ({', '.join(targets)}) nor a path"
        )
    config = EveConfig.from_dict(data)
    try:
        image_config = resolve_image_config(folder, data)
    except FileNotFoundError as exc:
        default = DEFAULT_PRESET[config.version]
        logger.warning("%s; using the built-in %s geometry", exc, default)
        image_config = released_geometry(default).image_config()
    if image_config.version != config.version:
        raise ValueError(
            f"{folder}: image config is {image_config.version} but the model is {config.version}"
        )
    if image_config.token_stride != config.token_stride:
        raise ValueError(
            f"{folder}: image config token stride {image_config.token_stride} != model's {config.token_stride}"
        )
    return ProfileTarget(str(path), f"checkpoint {path}", config, image_config)


# ---------------------------------------------------------------------------------------------
# analytic MAC counts (integers; FLOPs = MACs * flops_per_mac)


def decoder_macs(
    config: EveConfig, n_tokens: int, n_logits: int, attention: AttentionCount = "dense", blend: bool = False
) -> dict[str, int]:
    """MACs of one prefill forward of the decoder over `n_tokens` (batch 1, no cache).

    `blend=True`: the official EVEv2 forward, which runs text and vision copies on every token.
    """
    n, d, layers = n_tokens, config.hidden_size, config.num_hidden_layers
    hd = config.head_dim
    assert hd is not None
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    branches = 2 if blend and config.modality_experts else 1
    pairs = {"dense": n * n, "causal": n * (n + 1) // 2, "none": 0}[attention]
    return {
        "attn_proj": layers * branches * n * d * (2 * q_out + 2 * kv_out),
        "attn_scores": layers * 2 * config.num_attention_heads * hd * pairs,  # QK^T and AV
        "mlp": layers * branches * 3 * n * d * config.intermediate_size,
        "lm_head": n_logits * d * config.vocab_size,
    }


def decode_step_macs(config: EveConfig, context: int) -> int:
    """MACs of generating one text token with `context` cached keys (text weights, one logit row)."""
    hd = config.head_dim
    assert hd is not None
    d = config.hidden_size
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = d * (2 * q_out + 2 * kv_out) + 3 * d * config.intermediate_size
    per_layer += 2 * config.num_attention_heads * hd * (context + 1)
    return config.num_hidden_layers * per_layer + d * config.vocab_size


def _projector_macs(config: EveConfig, n: int) -> int:
    kind, c, d = config.projector_type, config.vision_hidden_size, config.hidden_size
    if kind == "identity":
        return 0
    if kind == "linear":
        return n * c * d
    depth = int(kind[3:-6])  # mlpNx_gelu
    return n * (c * d + (depth - 1) * d * d)


def eve_vision_macs(config: EveConfig, h: int, w: int) -> dict[str, int]:
    """MACs of the EVE patch embedding (+ v1 projector) for one image with an h x w token grid."""
    c, p, s = config.vision_hidden_size, config.patch_stride, config.merge_stride
    big_h, big_w = h * s, w * s
    patches = big_h * big_w * 3 * p * p * c
    if config.version == "v2":
        return {"patch_embedding": patches, "merge_conv": h * w * c * s * s * config.hidden_size}
    local = h * w * c * c + big_h * big_w * 2 * c * c + 2 * h * w * s * s * c + h * w * c * c
    global_ = c * c + h * w * 2 * c * c + 2 * h * w * c + c * c
    n_tokens = 1 + h * (w + 1)
    return {
        "patch_embedding": patches,
        "local_attention": local,
        "global_attention": global_,
        "projector": _projector_macs(config, n_tokens),
    }


def encoder_vision_macs(config: EveConfig, w_px: int, h_px: int) -> dict[str, int]:
    """MACs of an encoder-based model's vision part (`vision: encoder`) for one w_px x h_px image:
    the pretrained encoder and the MLP projector, as torch's FlopCounterMode counts their forward on
    the meta device (the encoder is someone else's architecture: EfficientNet's depthwise
    convolutions or a transformers ViT, so it is counted by running it, not by a formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..model.encoder_vision import EncoderVision

    with torch.device("meta"):  # the vision tower alone: the decoder is counted by formula
        tower = EncoderVision(config)
    pixels = torch.empty(1, 3, h_px, w_px, device="meta")
    with FlopCounterMode(display=False) as encoder:
        feats = tower.encode(pixels)
    with FlopCounterMode(display=False) as projector:
        tower.projector(feats)
    return {"encoder": encoder.get_total_flops() // 2, "projector": projector.get_total_flops() // 2}


def clip_vision_macs(spec: ClipVisionSpec, llm_hidden: int) -> dict[str, int]:
    """MACs of a CLIP ViT (every layer runs, as in Hugging Face's CLIPVisionModel) and LLaVA's projector."""
    c, f, g, p = spec.hidden_size, spec.intermediate_size, spec.grid, spec.patch_size
    n = g * g + 1
    per_layer = 4 * n * c * c + 2 * n * n * c + 2 * n * c * f
    projector = g * g * (c * llm_hidden + (spec.projector_depth - 1) * llm_hidden * llm_hidden)
    return {
        "patch_embedding": g * g * 3 * p * p * c,
        "encoder_layers": spec.num_layers * per_layer,
        "projector": projector,
    }


def clip_vision_params(spec: ClipVisionSpec, llm_hidden: int) -> dict[str, int]:
    """Parameters of Hugging Face's CLIPVisionModel layout and of the LLaVA projector."""
    c, f, g, p = spec.hidden_size, spec.intermediate_size, spec.grid, spec.patch_size
    embeddings = 3 * p * p * c + c + (g * g + 1) * c
    per_layer = 2 * c + 4 * (c * c + c) + 2 * c + (c * f + f) + (f * c + c)
    encoder = embeddings + 2 * c + spec.num_layers * per_layer + 2 * c  # pre- and post-layernorm
    projector = (
        c * llm_hidden + llm_hidden + (spec.projector_depth - 1) * (llm_hidden * llm_hidden + llm_hidden)
    )
    return {"encoder": encoder, "projector": projector}


# ---------------------------------------------------------------------------------------------
# parameters on the meta device

_VISION_PREFIXES = ("model.vision_tower.", "model.mm_projector.")


def meta_model(config: EveConfig) -> EveForCausalLM:
    """`EveForCausalLM(config)` with no storage (parameter shapes only)."""
    with torch.device("meta"):
        return EveForCausalLM(config)


@functools.lru_cache(maxsize=32)
def _cached_counts(config_json: str) -> tuple[tuple[str, int], ...]:
    config = EveConfig.from_dict(json.loads(config_json))
    return tuple(split_parameters(meta_model(config)).items())


def parameter_counts(config: EveConfig) -> dict[str, int]:
    """`split_parameters` of `EveForCausalLM(config)` built on the meta device (cached per config)."""
    return dict(_cached_counts(json.dumps(config.to_dict(), sort_keys=True)))


def split_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameter counts: vision part, LLM part, and the LLM weights a text token uses."""
    seen: set[int] = set()
    out = {"vision": 0, "llm": 0, "llm_text_path": 0, "training_only": 0}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("model.vision_tower_compressor."):
            out["training_only"] += p.numel()
        elif name.startswith(_VISION_PREFIXES):
            out["vision"] += p.numel()
        else:
            out["llm"] += p.numel()
            if "moe_" not in name:
                out["llm_text_path"] += p.numel()
    return out


# ---------------------------------------------------------------------------------------------
# the profile


@dataclass
class Profile:
    """Everything `eve profile` reports (FLOPs under `convention`, one image + prompt, batch 1)."""

    name: str
    description: str
    convention: Convention
    image_size: tuple[int, int]
    pixel_size: tuple[int, int]
    grid: tuple[int, int]
    visual_tokens: int
    prompt_tokens: int
    vision_flops: int
    llm_flops: int
    vision_params: int
    llm_params: int
    llm_text_path_params: int
    decode_flops_per_token: int
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    official_blend_llm_flops: int | None = None
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["convention"] = dataclasses.asdict(self.convention)
        out["total_params"] = self.vision_params + self.llm_params
        return out


def visual_geometry(
    target: ProfileTarget, width: int, height: int
) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(pixel size (W, H), token grid (h, w), visual tokens the LLM receives) for an input image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if target.clip is not None:  # LLaVA-1.5: pad to square, resize to the CLIP input size
        g = target.clip.grid
        return (target.clip.image_size, target.clip.image_size), (g, g), g * g
    cfg = target.image_config
    assert cfg is not None
    w_px, h_px = pixel_size(width, height, cfg)
    grid = (h_px // cfg.token_stride, w_px // cfg.token_stride)
    return (w_px, h_px), grid, num_image_tokens_for_size(width, height, cfg)


def profile(
    target: ProfileTarget,
    image_size: tuple[int, int] | None = None,
    prompt_tokens: int = 0,
    convention: Convention = STANDARD,
) -> Profile:
    """FLOPs and parameters of the vision part and the LLM part for one image and a text prompt."""
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
    width, height = image_size or target.default_image_size
    pixels, (gh, gw), n_visual = visual_geometry(target, width, height)
    config = target.config
    params = parameter_counts(config)
    if target.clip is not None:  # LLaVA: CLIP + projector; the decoder's own EVE vision part is ignored
        vision_macs = clip_vision_macs(target.clip, config.hidden_size)
        clip_params = clip_vision_params(target.clip, config.hidden_size)
        vision_params = clip_params["encoder"] + clip_params["projector"]
    elif config.vision == "encoder":
        vision_macs = encoder_vision_macs(config, *pixels)
        vision_params = params["vision"]
    else:
        vision_macs = eve_vision_macs(config, gh, gw)
        vision_params = params["vision"]

    llm_visual = gh * gw if convention.llm_visual_tokens == "grid" else n_visual
    n_llm = llm_visual + prompt_tokens
    n_logits = {"all": n_llm, "last": 1, "none": 0}[convention.lm_head]
    llm_macs = decoder_macs(config, n_llm, n_logits, convention.attention)
    blend = None
    if config.modality_experts:
        blend_macs = decoder_macs(config, n_llm, n_logits, convention.attention, blend=True)
        blend = sum(blend_macs.values()) * convention.llm_flops_per_mac

    vf, lf = convention.vision_flops_per_mac, convention.llm_flops_per_mac
    return Profile(
        name=target.name,
        description=target.description,
        convention=convention,
        image_size=(width, height),
        pixel_size=pixels,
        grid=(gh, gw),
        visual_tokens=n_visual,
        prompt_tokens=prompt_tokens,
        vision_flops=sum(vision_macs.values()) * vf,
        llm_flops=sum(llm_macs.values()) * lf,
        vision_params=vision_params,
        llm_params=params["llm"],
        llm_text_path_params=params["llm_text_path"],
        decode_flops_per_token=decode_step_macs(config, n_visual + prompt_tokens) * lf,
        breakdown={
            "vision_flops": {k: v * vf for k, v in vision_macs.items()},
            "llm_flops": {k: v * lf for k, v in llm_macs.items()},
        },
        official_blend_llm_flops=blend,
    )


# ---------------------------------------------------------------------------------------------
# the paper's efficiency table


@dataclass(frozen=True)
class PaperRow:
    """One FLOPs cell of the EVE paper's efficiency table and the component of ours it matches."""

    row: str
    target: str
    column: Literal["vision", "llm"]
    paper_flops: float
    components: tuple[str, ...] | None = None  # vision breakdown keys; None = the whole column


PAPER_ROWS = (
    PaperRow("LLaVA-1.5", "llava-1.5-7b", "vision", 372e9, ("patch_embedding", "encoder_layers")),
    PaperRow("EVE-7B", "eve-7b-v1", "vision", 42e9),
    PaperRow("EVE-7B", "eve-7b-v1", "llm", 15.2e12),
    PaperRow("EVE-7B-HD", "eve-7b-hd-v1", "vision", 170e9),
    PaperRow("EVE-7B-HD", "eve-7b-hd-v1", "llm", 60.8e12),
)


def paper_comparison(rows: tuple[PaperRow, ...] = PAPER_ROWS) -> list[dict[str, Any]]:
    """Our counts under `PAPER` (square image at native size, no prompt) next to the paper's."""
    targets = builtin_targets()
    out = []
    for r in rows:
        prof = profile(targets[r.target], convention=PAPER)
        if r.column == "llm":
            ours = prof.llm_flops
        elif r.components is None:
            ours = prof.vision_flops
        else:
            ours = sum(prof.breakdown["vision_flops"][k] for k in r.components)
        out.append(
            {
                "row": r.row,
                "target": r.target,
                "column": r.column,
                "image_size": list(prof.image_size),
                "paper_flops": r.paper_flops,
                "our_flops": ours,
                "relative_diff": ours / r.paper_flops - 1.0,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# latency of a real forward (small configs only)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    target: ProfileTarget,
    image_size: tuple[int, int] | None = None,
    prompt_tokens: int = 0,
    *,
    max_params: float = 1.5e9,
    repeats: int = 3,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Median wall time of the vision part and of a full prefill forward on a random-weight model.

    Returns {"skipped": reason} when the target is not an EVE model or is larger than `max_params`.
    """
    if target.clip is not None:
        return {"skipped": "latency needs an EVE model (the LLaVA row is FLOPs and parameters only)"}
    counts = parameter_counts(target.config)
    total = counts["vision"] + counts["llm"]
    if total > max_params:
        return {
            "skipped": f"{total / 1e9:.2f} B parameters exceed the latency limit of {max_params / 1e9:.2f} B"
        }
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # initialise in the final dtype: no fp32 copy of a large model
    try:
        with torch.device(dev):
            model = EveForCausalLM(target.config).eval()
    finally:
        torch.set_default_dtype(previous)
    width, height = image_size or target.default_image_size
    (w_px, h_px), _, n_visual = visual_geometry(target, width, height)
    pixels = torch.randn(3, h_px, w_px, device=dev, dtype=dt)
    text = torch.randint(0, target.config.vocab_size, (prompt_tokens,), device=dev)
    ids = torch.cat((torch.tensor([IMAGE_TOKEN_INDEX], device=dev), text))[None]

    def timed(fn) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            _sync(dev)
            start = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    with torch.inference_mode():
        vision_s = timed(lambda: model.model.encode_images([pixels]))
        prefill_s = timed(lambda: model(ids, images=[pixels], logits_to_keep=1))
    return {
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "vision_ms": vision_s * 1e3,
        "prefill_ms": prefill_s * 1e3,
        "llm_ms": max(prefill_s - vision_s, 0.0) * 1e3,
        "prefill_tokens": n_visual + prompt_tokens,
        "repeats": repeats,
    }
