"""One configuration for every EVE model: the decoder family, the EVE version and the vision part.

Llama and Qwen2 differ only in field values (q/k/v bias, RoPE theta, norm eps, GQA); EVE v1 and v2
differ in the vision embedding and in whether decoder layers carry modality-specific copies.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal

from transformers import PretrainedConfig

Version = Literal["v1", "v2"]
Family = Literal["llama", "qwen2"]

OUR_MODEL_TYPE = "eve_vlm"
OFFICIAL_MODEL_TYPES = {"eve": "v1", "eve-qwen2": "v2"}


class ConfigError(ValueError):
    """A configuration that cannot describe a model we can build."""


PATCH_ACTIVATIONS = ("none", "gelu")  # v1 patch conv: linear (official) or bias + GELU (ours)
VISION_KINDS = ("patch", "encoder")  # EVE's patch embedding, or a pretrained encoder + projector
EFFICIENTNET_ENCODER = "efficientnet-lite0"
EFFICIENTNET_STAGES = ("stride8", "stride16", "stride32")  # model.teacher_efficientnet.STAGES


# Keys Hugging Face writes into every config.json next to a model's own fields.
_HF_KEYS = frozenset({"model_type", "transformers_version", "architectures", "torch_dtype", "_name_or_path", "auto_map",
                      "use_cache", "output_attentions", "num_labels"})


_NOT_COMPARED = frozenset({"transformers_version", "dtype", "architectures"})


class EveConfig(PretrainedConfig):
    """Everything needed to build an `EveForCausalLM` (no weights, no processor).

    A `transformers` config (itself a dataclass), so `AutoConfig`, `from_pretrained` and the
    `Trainer` / PEFT machinery accept it; `from_dict` also reads the released EVE configs.
    """

    model_type: ClassVar[str] = OUR_MODEL_TYPE

    version: Version = "v2"
    family: Family = "qwen2"
    # Decoder (Hugging Face names and meanings).
    vocab_size: int = 1000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float | int = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # q/k/v bias (Qwen2: True); o_proj never has a bias
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Vision part.
    vision_hidden_size: int = 1024  # official `mm_hidden_size`
    patch_stride: int = 14  # pixels per conv patch (v1 14, v2 16)
    merge_stride: int = 2  # v1 conv_stride (2x2 pooling window), v2 dense_stride (2x2 conv)
    vision_num_heads: int = 8  # v1 local/global cross-attention heads (fixed in the official code)
    projector_type: str = "mlp2x_gelu"  # v1 only
    # v1 only: "gelu" gives the patch conv a bias and a GELU before the 2x2 merge (not in the official
    # model, whose conv is linear). Measured: easy-VQA shape is learned from fewer images (86% vs 65%
    # after 200 steps of 32, bench/shape_probe.py; docs/quickstart.md).
    patch_activation: str = "none"
    # v2 modality-specific copies ("moe" in the official code) of norms, attention projections, MLP.
    modality_experts: bool = False
    # v1 patch aligning layer (training only).
    aligning_layer_rate: int = 4
    aligning_num_heads: int = 8
    teacher_hidden_size: int | None = None
    # Where visual tokens come from: "patch" (EVE's encoder-free patch embedding) or "encoder" (the
    # LLaVA-style baseline: a pretrained vision encoder + a 2-layer MLP projector; model.encoder_vision).
    vision: str = "patch"
    # The encoder of vision="encoder": "efficientnet-lite0" (the installed ImageNet weights) or the
    # path of a local `transformers` vision model folder (CLIP, SigLIP).
    vision_encoder: str = "efficientnet-lite0"
    vision_encoder_stage: str = "stride16"  # EfficientNet-Lite0 feature map used as the token grid
    vision_encoder_layer: int = -1  # transformers encoders: hidden-state index (-1: the last layer)
    vision_encoder_trainable: bool = False  # frozen unless asked (recipes then train group "encoder")
    # The transformers encoder's own config, recorded when the model is built so that a saved folder
    # rebuilds it without the original encoder folder.
    vision_encoder_config: dict[str, Any] | None = None
    # Official fields we do not use but keep so a converted config round-trips.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.version not in ("v1", "v2"):
            raise ConfigError(f"unknown EVE version {self.version!r} (expected 'v1' or 'v2')")
        if self.family not in ("llama", "qwen2"):
            raise ConfigError(f"unknown decoder family {self.family!r} (expected 'llama' or 'qwen2')")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.patch_activation not in PATCH_ACTIVATIONS:
            raise ConfigError(f"unknown patch_activation {self.patch_activation!r} (expected one of {PATCH_ACTIVATIONS})")
        if self.patch_activation != "none" and self.version != "v1":
            raise ConfigError("patch_activation applies to EVE v1 only (v2's patch embedding has its GELU)")
        self._check_vision()
        if self.version == "v1" and self.vision == "patch" and self.vision_hidden_size % self.vision_num_heads:
            raise ConfigError(
                f"vision_hidden_size={self.vision_hidden_size} must be divisible by "
                f"vision_num_heads={self.vision_num_heads}"
            )

    def _check_vision(self) -> None:
        """The encoder-based baseline shares the decoder only: EVE's vision-side extras are errors."""
        if self.vision not in VISION_KINDS:
            raise ConfigError(f"unknown vision {self.vision!r} (expected one of {VISION_KINDS})")
        if self.vision != "encoder":
            return
        if self.modality_experts:
            raise ConfigError("vision='encoder' cannot have modality_experts (EVEv2's vision copies of the decoder)")
        if self.patch_activation != "none":
            raise ConfigError("vision='encoder' has no patch conv: patch_activation must be 'none'")
        if not self.vision_encoder:
            raise ConfigError("vision='encoder' needs vision_encoder ('efficientnet-lite0' or a model folder)")
        if self.vision_encoder == EFFICIENTNET_ENCODER and self.vision_encoder_stage not in EFFICIENTNET_STAGES:
            raise ConfigError(
                f"unknown vision_encoder_stage {self.vision_encoder_stage!r} (expected one of {EFFICIENTNET_STAGES})"
            )

    def __eq__(self, other: object) -> bool:
        """Equal when they describe the same model (not the same transformers version or load dtype)."""
        if not isinstance(other, EveConfig):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self)
                   if f.name not in _NOT_COMPARED)

    __hash__ = None  # type: ignore[assignment]  # mutable

    @property
    def token_stride(self) -> int:
        """Pixels per visual token side."""
        return self.patch_stride * self.merge_stride

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["model_type"] = OUR_MODEL_TYPE
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> Any:
        """Parse our own config or an official EVE config (`model_type` "eve" / "eve-qwen2").

        Unknown fields of our own configs are errors (a typo must not silently become a default).
        `kwargs` are Hugging Face's (`return_unused_kwargs`, overrides).
        """
        model_type = data.get("model_type")
        if model_type == OUR_MODEL_TYPE:
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - names - _HF_KEYS)
            if unknown:
                raise ConfigError(f"unknown config fields {unknown}")
            data = {k: v for k, v in data.items() if k != "model_type"}
        elif model_type in OFFICIAL_MODEL_TYPES:
            data = official_fields(data)
        else:
            raise ConfigError(
                f"unknown model_type {model_type!r}: expected {OUR_MODEL_TYPE!r} or an official EVE type "
                f"{sorted(OFFICIAL_MODEL_TYPES)}"
            )
        # Always our class: the released model types are registered as aliases that read into it.
        return PretrainedConfig.from_dict.__func__(EveConfig, data, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Any:
        """Read config.json of our folders and the released ones (no model-type mismatch warning:
        the released types are read by `from_dict`)."""
        data, kwargs = cls.get_config_dict(path, **kwargs)
        return cls.from_dict(data, **kwargs)

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> EveConfig:
        path = Path(folder, "config.json")
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        return cls.from_dict(json.loads(path.read_text()))

    def text_config_dict(self) -> dict[str, Any]:
        """The decoder as a plain Hugging Face Llama/Qwen2 config (for exporting the LLM alone)."""
        out = {
            "model_type": self.family,
            "architectures": ["LlamaForCausalLM" if self.family == "llama" else "Qwen2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
        }
        if self.family == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        return out


_DECODER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def decoder_fields_from_hf(data: dict[str, Any]) -> dict[str, Any]:
    """Decoder fields of a Hugging Face Llama / Qwen2 config dict (also the official EVE configs)."""
    model_type = data.get("model_type", "")
    family: Family
    if model_type in ("qwen2", "eve-qwen2"):
        family = "qwen2"
    elif model_type in ("llama", "eve", "mistral"):
        family = "llama"
    else:
        raise ConfigError(f"unsupported LLM model_type {model_type!r}: expected a Llama- or Qwen2-family config")
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {data.get('hidden_act')!r} (only silu)")
    out: dict[str, Any] = {k: data[k] for k in _DECODER_FIELDS if k in data}
    out["family"] = family
    out.setdefault("num_key_value_heads", data.get("num_attention_heads"))
    if data.get("head_dim"):
        out["head_dim"] = data["head_dim"]
    # Qwen2 always has q/k/v biases; Llama has them only with attention_bias.
    out["attention_bias"] = True if family == "qwen2" else bool(data.get("attention_bias", False))
    out["mlp_bias"] = bool(data.get("mlp_bias", False))
    rope = data.get("rope_parameters")  # transformers 5 layout
    if isinstance(rope, dict):
        out.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out.setdefault("rope_theta", 10000.0)
    if data.get("use_sliding_window"):
        raise ConfigError("sliding-window attention is not supported")
    return out


def official_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Our config fields for a released EVE config dict (strides are fixed from the weights later)."""
    version = OFFICIAL_MODEL_TYPES[data["model_type"]]
    fields = decoder_fields_from_hf(data)
    used = set(_DECODER_FIELDS) | {"model_type", "head_dim", "attention_bias", "mlp_bias", "mm_hidden_size"}
    fields["version"] = version
    fields["vision_hidden_size"] = data.get("mm_hidden_size", 1024)
    if version == "v1":
        projector = data.get("mm_projector_type", "mlp2x_gelu")
        fields["projector_type"] = projector
        fields["patch_stride"], fields["merge_stride"] = 14, 2
    else:
        moe = bool(data.get("add_moe", False))
        part = data.get("moe_part", "layernorm-self_attn-mlp" if moe else "")
        if moe and set(part.split("-")) != {"layernorm", "self_attn", "mlp"}:
            raise ConfigError(f"moe_part={part!r} is not supported (only 'layernorm-self_attn-mlp')")
        fields["modality_experts"] = moe
        fields["patch_stride"], fields["merge_stride"] = 16, 2
    fields["extra"] = {k: v for k, v in data.items() if k not in used and k not in _HF_KEYS}
    return fields
