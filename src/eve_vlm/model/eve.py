"""`EveForCausalLM`: patch embedding + splicing + the one decoder + LM head (+ aligning loss).

Parameter names are the official ones (`model.embed_tokens`, `model.layers.N...`,
`model.vision_tower...`, `model.mm_projector...`, `lm_head`), so released EVE checkpoints and plain
Llama/Qwen2 LLM folders load without renaming.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import logging as hf_logging

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .aligning import PatchAligningLayer, Teacher, cosine_alignment_loss
from .checkpoint import (
    TRAINING_ONLY_PREFIXES,
    CheckpointError,
    official_geometry,
    read_aligning_weights,
    save_checkpoint,
    stored_dtype,
    stored_keys_with_prefix,
)
from .config import EveConfig
from .decoder import Decoder, KVCache, RotaryEmbedding, rope_inv_freq
from .encoder_vision import EncoderVision
from .vision import PatchEmbeddingV1, PatchEmbeddingV2, VisionOutput, build_projector, crop_official_layout

logger = logging.getLogger(__name__)


class EveModel(Decoder):
    """The decoder plus the vision modules, under the official `model.` prefix."""

    def __init__(self, config: EveConfig) -> None:
        super().__init__(config)
        if config.vision == "encoder":  # the encoder-based baseline (model.encoder_vision)
            self.vision_tower: nn.Module = EncoderVision(config)
            self.mm_projector: nn.Module | None = None
        elif config.version == "v1":
            self.vision_tower = PatchEmbeddingV1(config)
            self.mm_projector = build_projector(config)
        else:
            self.vision_tower = PatchEmbeddingV2(config)
            self.mm_projector = None
        self.vision_tower_compressor: PatchAligningLayer | None = None  # v1 training only

    def encode_images(self, images: list[Tensor]) -> VisionOutput:
        out = self.vision_tower(images)
        if self.mm_projector is not None:
            out.tokens = self.mm_projector(out.tokens)
        return out


@dataclass
class Spliced:
    """A batch after `<image>` placeholders were replaced by visual tokens."""

    embeds: Tensor  # [B, L, D]
    valid: Tensor  # [B, L] bool: real tokens
    visual_mask: Tensor  # [B, L] bool
    positions: Tensor  # [B, L] RoPE positions (restart per packed segment and per branch)
    labels: Tensor | None  # [B, L]
    segments: Tensor | None  # [B, L] packed-sample ids, only when packing
    branches: Tensor | None  # [B, L] 0 = shared prefix, k = k-th branch; only with branch_ids
    image_starts: Tensor  # [n_images] flat index (into B*L) of each image's CLS token


@dataclass
class EveOutput:
    logits: Tensor | None = None
    loss: Tensor | None = None  # lm_loss + aligning_loss_weight * aligning_loss
    lm_loss: Tensor | None = None  # mean over supervised tokens of this batch
    lm_loss_sum: Tensor | None = None  # sum over supervised tokens (for per-token accumulation)
    num_label_tokens: int = 0
    aligning_loss: Tensor | None = None
    past_key_values: KVCache | None = None
    valid: Tensor | None = None  # [B, L] spliced validity (for callers that continue generation)

    # The mapping view Hugging Face's `generate` reads (`"cache" in out`, `out.get("cache")`).
    @property
    def cache(self) -> KVCache | None:
        return self.past_key_values

    def __contains__(self, key: str) -> bool:
        return getattr(self, key, None) is not None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None)
        return default if value is None else value


class EveForCausalLM(PreTrainedModel, GenerationMixin):
    """An encoder-free vision-language model (EVE v1 or v2) over a Llama- or Qwen2-family decoder.

    A `transformers` model: `AutoModelForCausalLM`, `generate`, `device_map`, PEFT and the
    `Trainer` work with it; the decoder, splicing and cache are this package's own.
    """

    config_class = EveConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer", "PatchEmbeddingV1", "PatchEmbeddingV2", "EncoderVision"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Training-only tensors of released and training checkpoints: read on request, never an error.
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower_compressor\.", r"^model\.vision_clip\.", r"rotary_emb\.inv_freq$"]
    _supports_sdpa = True

    def __init__(self, config: EveConfig) -> None:
        super().__init__(config)
        self.model = EveModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.teacher: Teacher | None = None  # frozen, never saved, never a registered submodule
        self.aligning_loss_weight = 1.0
        # Aligning-layer weights loaded from a training checkpoint, kept until a training stage
        # attaches a teacher (the layer cannot be built without knowing the teacher's width).
        self.pending_aligning_weights: dict[str, Tensor] | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Only what loading leaves unset: RoPE's non-persistent buffer. Fresh models keep torch's
        own initialisation (done in the constructors), which the recipes were tuned with."""
        if isinstance(module, RotaryEmbedding):
            with torch.no_grad():
                module.inv_freq.copy_(rope_inv_freq(self.config).to(module.inv_freq.device))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def gradient_checkpointing_enable(self, enabled: bool = True, gradient_checkpointing_kwargs: Any = None) -> None:
        self.model.gradient_checkpointing = enabled

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.model.gradient_checkpointing)

    # ------------------------------------------------------------------ aligning layer
    def attach_aligning_layer(self, teacher: Teacher, weights: dict[str, Tensor] | None = None) -> None:
        """Attach the v1 patch aligning layer (training only) supervised by a frozen teacher."""
        if self.config.version != "v1" or self.config.vision != "patch":
            raise ValueError("the patch aligning layer exists only for EVE v1 (not for the encoder-based model)")
        layer = PatchAligningLayer(
            self.config.hidden_size,
            teacher.hidden_size,
            self.config.num_hidden_layers,
            self.config.aligning_layer_rate,
            self.config.aligning_num_heads,
        ).to(device=self.device, dtype=self.dtype)
        if weights:
            prefix = "model.vision_tower_compressor."
            sub = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in weights.items()}
            layer.load_state_dict(sub, strict=True)
        self.model.vision_tower_compressor = layer
        # Plain attribute, not a submodule: the frozen teacher is never saved with the model.
        object.__setattr__(self, "teacher", teacher)
        self.config.teacher_hidden_size = teacher.hidden_size

    def detach_aligning_layer(self) -> None:
        self.model.vision_tower_compressor = None
        object.__setattr__(self, "teacher", None)

    # ------------------------------------------------------------------ splicing
    def prepare_images(self, images: list[Tensor] | Tensor | None) -> list[Tensor]:
        """Accept a list of [3, H, W] tensors, a [B, 3, H, W] batch, or official v1 [B, 4, S, S]."""
        if images is None:
            return []
        if isinstance(images, Tensor):
            if images.dim() == 3:
                images = images[None]
            if images.dim() != 4:
                raise ValueError(f"images tensor must be [B, C, H, W], got shape {tuple(images.shape)}")
            if images.shape[1] == 4:
                return crop_official_layout(images, self.config.patch_stride)
            images = list(images)
        images = [crop_official_layout(img[None], self.config.patch_stride)[0] if img.dim() == 3 and img.shape[0] == 4 else img for img in images]
        stride = self.config.token_stride
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i} must be a [3, H, W] tensor, got shape {tuple(img.shape)}")
            if img.shape[1] % stride or img.shape[2] % stride or img.shape[1] == 0 or img.shape[2] == 0:
                raise ValueError(
                    f"image {i} has size {tuple(img.shape[1:])}: both sides must be positive multiples of "
                    f"{stride} (use EveProcessor to prepare images)"
                )
        return [img.to(device=self.device, dtype=self.dtype) for img in images]

    def splice(
        self,
        input_ids: Tensor,
        vision: VisionOutput | None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        segment_ids: Tensor | None = None,
        padding_side: str = "right",
        branch_ids: Tensor | None = None,
    ) -> Spliced:
        """Replace every IMAGE_TOKEN_INDEX by its image's tokens with tensor ops (no per-sample loop).

        The caller's `input_ids` is never modified (the official v2 code writes 0 into it).
        """
        b, t = input_ids.shape
        device = input_ids.device
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_img = (input_ids == IMAGE_TOKEN_INDEX) & valid
        lengths = vision.lengths if vision is not None else []
        n_img = int(is_img.sum())
        if n_img != len(lengths):
            per_row = is_img.sum(1).tolist()
            raise ValueError(
                f"input_ids hold {n_img} <image> placeholders (per sample: {per_row}) but {len(lengths)} "
                "images were given"
            )
        span = valid.long()
        lens = torch.tensor(lengths, dtype=torch.long, device=device)
        if n_img:
            span = span.masked_scatter(is_img, lens)
        row_len = span.sum(1)
        total = int(row_len.max()) if b else 0
        start = span.cumsum(1) - span
        if padding_side == "left":
            start = start + (total - row_len)[:, None]
        flat_start = start + torch.arange(b, device=device)[:, None] * total
        text = valid & ~is_img

        token_embeds = self.model.embed_tokens(input_ids.clamp(min=0))
        d = token_embeds.shape[-1]
        text_pos = flat_start[text]
        embeds = token_embeds.new_zeros(b * total, d).index_put((text_pos,), token_embeds[text])
        visual = torch.zeros(b * total, dtype=torch.bool, device=device)
        out_valid = visual.clone()
        out_valid[text_pos] = True
        image_starts = flat_start[is_img]
        if n_img:
            offsets = torch.arange(int(lens.sum()), device=device) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
            img_pos = torch.repeat_interleave(image_starts, lens) + offsets
            embeds = embeds.index_put((img_pos,), vision.tokens.to(embeds.dtype))  # type: ignore[union-attr]
            visual[img_pos] = True
            out_valid[img_pos] = True
        out_labels = None
        if labels is not None:
            out_labels = torch.full((b * total,), IGNORE_INDEX, dtype=torch.long, device=device)
            out_labels[text_pos] = labels[text]
            out_labels = out_labels.view(b, total)
        segments = out_valid.long()
        if segment_ids is not None:
            segments = self._spread(segment_ids, text, text_pos, is_img, img_pos if n_img else None, lens, b * total)
        segments = segments.view(b, total)
        branches = None
        if branch_ids is not None:
            branches = self._spread(branch_ids, text, text_pos, is_img, img_pos if n_img else None, lens, b * total)
            branches = branches.view(b, total)
        positions = token_positions(segments, branches, out_valid.view(b, total))
        return Spliced(
            embeds=embeds.view(b, total, d),
            valid=out_valid.view(b, total),
            visual_mask=visual.view(b, total),
            positions=positions,
            labels=out_labels,
            segments=segments if segment_ids is not None else None,
            branches=branches,
            image_starts=image_starts,
        )

    @staticmethod
    def _spread(ids: Tensor, text: Tensor, text_pos: Tensor, is_img: Tensor, img_pos: Tensor | None,
                lens: Tensor, size: int) -> Tensor:
        """Per-token ids of the input layout moved to the spliced layout (an image's id on all its tokens)."""
        out = torch.zeros(size, dtype=torch.long, device=ids.device)
        out[text_pos] = ids[text].long()
        if img_pos is not None:
            out[img_pos] = torch.repeat_interleave(ids[is_img].long(), lens)
        return out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        images: list[Tensor] | Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        segment_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        teacher_pixels: Tensor | None = None,
        teacher_masks: Tensor | None = None,
        padding_side: str = "right",
        return_logits: bool = True,
        logits_to_keep: int = 0,
        branch_ids: Tensor | None = None,
        cache: KVCache | None = None,
        return_dict: bool | None = None,
    ) -> EveOutput:
        """Logits and losses for a batch of text with `<image>` placeholders.

        `images` holds one tensor per placeholder, in row-major placeholder order. `segment_ids`
        marks packed samples (attention and positions stay inside each). `branch_ids` marks
        continuations that share a prefix (0 = the shared prefix, k = branch k, one after another):
        each branch sees the prefix and itself, never another branch, and its positions continue
        from the prefix, so one row trains several questions about one image exactly as separate
        samples would. With `use_cache` or a `past_key_values`, the returned cache continues
        generation (`logits_to_keep=1` for a prefill). `cache` is `past_key_values` under the name
        Hugging Face's `generate` uses; `return_dict` is accepted for it and ignored (always an
        `EveOutput`).
        """
        if cache is not None:
            if past_key_values is not None and past_key_values is not cache:
                raise ValueError("pass the KV cache as `past_key_values` or `cache`, not both")
            past_key_values = cache
        pixel_list = self.prepare_images(images)
        vision = self.model.encode_images(pixel_list) if pixel_list else None
        sp = self.splice(input_ids, vision, attention_mask, labels, segment_ids, padding_side, branch_ids)
        if sp.branches is not None and (past_key_values is not None or use_cache):
            raise ValueError("branch_ids (shared-prefix training rows) cannot be combined with a KV cache")
        cache = past_key_values
        positions = sp.positions
        if cache is not None and cache.next_position is not None:
            positions = cache.next_position[:, None] + sp.valid.long().cumsum(1) - 1
        elif use_cache:
            cache = KVCache()
        aligner = self.model.vision_tower_compressor
        want_align = (
            aligner is not None
            and self.training
            and self.teacher is not None
            and teacher_pixels is not None
            and vision is not None
        )
        collect = frozenset(aligner.layer_idx) if want_align else frozenset()  # type: ignore[union-attr]
        # Only the final hidden states something reads are computed by the last layer: those with a
        # target (training without logits) or the last `logits_to_keep` (a prefill).
        targets = next_token_targets(sp) if sp.labels is not None else None
        keep = None
        if self.config.num_hidden_layers not in collect:
            if targets is not None and not return_logits:
                keep = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)  # position t predicts t + 1
            elif targets is None and return_logits and 0 < logits_to_keep < sp.valid.shape[1]:
                keep = torch.zeros_like(sp.valid)
                keep[:, -logits_to_keep:] = True
        hidden, kept = self.model.run_layers(
            sp.embeds,
            positions,
            sp.valid,
            visual_mask=sp.visual_mask if self.config.modality_experts else None,
            segment_ids=sp.segments,
            branch_ids=sp.branches,
            cache=cache,
            collect=collect,
            keep=keep,
        )
        if cache is not None:
            last = positions.masked_fill(~sp.valid, -1).amax(dim=1)
            cache.next_position = last + 1

        out = EveOutput(past_key_values=cache, valid=sp.valid)
        if return_logits:
            if keep is not None:
                h = hidden.view(sp.valid.shape[0], logits_to_keep, -1)
            else:
                h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            out.logits = self.lm_head(h)
        if targets is not None:
            self._lm_loss(out, targets, hidden, only_targets=keep is not None)
        if want_align:
            out.aligning_loss = self._aligning_loss(kept, sp, vision, teacher_pixels, teacher_masks)  # type: ignore[arg-type]
            out.loss = out.aligning_loss * self.aligning_loss_weight + (out.lm_loss if out.lm_loss is not None else 0)
        return out

    def _lm_loss(self, out: EveOutput, targets: Tensor, hidden: Tensor, only_targets: bool) -> None:
        """Mean and summed cross-entropy over the targets, from the full hidden states [B, L, D] or,
        `only_targets`, from those of the target positions alone ([N, D], row-major)."""
        selected = targets != IGNORE_INDEX
        n = int(selected.sum())
        if only_targets:
            logits = self.lm_head(hidden)
        elif out.logits is not None and out.logits.shape[1] == hidden.shape[1]:
            logits = out.logits[:, :-1][selected]
        else:
            logits = self.lm_head(hidden[:, :-1][selected])
        loss_sum = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
        out.lm_loss_sum = loss_sum
        out.num_label_tokens = n
        out.lm_loss = loss_sum / max(n, 1)
        out.loss = out.lm_loss

    def _aligning_loss(
        self,
        kept: dict[int, Tensor],
        sp: Spliced,
        vision: VisionOutput,
        teacher_pixels: Tensor,
        teacher_masks: Tensor | None,
    ) -> Tensor:
        aligner = self.model.vision_tower_compressor
        assert aligner is not None and self.teacher is not None
        device = sp.embeds.device
        with torch.no_grad():
            target_grid = self.teacher(teacher_pixels.to(device))  # [N, g, g, C]
        if teacher_masks is None:
            teacher_masks = torch.ones(target_grid.shape[:3], dtype=torch.bool, device=device)
        teacher_masks = teacher_masks.to(device).bool()
        targets = target_grid[teacher_masks]  # [T, C], row-major per image, images in order

        grids = torch.tensor(vision.grids, dtype=torch.long, device=device)  # [N, 2]
        n_img = grids.shape[0]
        band_h = teacher_masks.any(dim=2).sum(1)
        band_w = teacher_masks.any(dim=1).sum(1)
        ratio = grids[:, 0] // band_h.clamp(min=1)
        if not bool(((ratio * band_h == grids[:, 0]) & (ratio * band_w == grids[:, 1])).all()):
            raise ValueError(
                f"student token grids {vision.grids} do not match the teacher's valid regions "
                f"{list(zip(band_h.tolist(), band_w.tolist(), strict=True))} by an integer ratio"
            )
        h, w = grids[:, 0], grids[:, 1]
        hw = h * w
        img_id = torch.repeat_interleave(torch.arange(n_img, device=device), hw)
        m = torch.arange(int(hw.sum()), device=device) - torch.repeat_interleave(hw.cumsum(0) - hw, hw)
        wt = w[img_id]
        row, col = m // wt, m % wt
        pos = sp.image_starts[img_id] + 1 + row * (wt + 1) + col  # skip CLS and SPLIT tokens
        d = sp.embeds.shape[-1]
        feats = torch.stack([kept[i].reshape(-1, d)[pos] for i in aligner.layer_idx], dim=1)  # [P, J, D]
        r = ratio[img_id]
        pooled_w = w // ratio
        pooled_count = (h // ratio) * pooled_w
        pooled_index = (pooled_count.cumsum(0) - pooled_count)[img_id] + (row // r) * pooled_w[img_id] + col // r
        if bool((ratio > 1).any()):
            pooled = feats.new_zeros(int(pooled_count.sum()), *feats.shape[1:]).index_add(0, pooled_index, feats)
            pooled = pooled / (ratio.repeat_interleave(pooled_count) ** 2)[:, None, None].to(feats.dtype)
            token_image = torch.repeat_interleave(torch.arange(n_img, device=device), pooled_count)
        else:
            pooled, token_image = feats, img_id
        if pooled.shape[0] != targets.shape[0]:
            raise ValueError(f"{pooled.shape[0]} student patches vs {targets.shape[0]} teacher patches")
        pred = aligner(pooled)
        return cosine_alignment_loss(pred, targets.to(pred.dtype), token_image, n_img)

    # ------------------------------------------------------------------ v2 expert initialisation
    @torch.no_grad()
    def init_vision_experts_from_text(self) -> int:
        """Copy every text weight into its `moe_` vision copy (EVEv2 stage 0 -> 1); returns the count."""
        if not self.config.modality_experts:
            raise ValueError("this model has no modality-specific (vision) copies")
        params = dict(self.named_parameters())
        copied = 0
        for name, p in params.items():
            if "moe_" in name:
                p.copy_(params[name.replace("moe_", "")])
                copied += 1
        return copied

    # ------------------------------------------------------------------ Hugging Face generate
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own KVCache (spliced images make it longer than input_ids)

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        images: list[Tensor] | Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """First call: the whole prompt with its images (left-aligned prefill, last logits only);
        then only the newest token against the cache, which holds the spliced sequence."""
        if cache is None or cache.length == 0:
            return {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "images": images,
                "use_cache": True,
                "padding_side": "left",
                "logits_to_keep": 1,
            }
        step = input_ids[:, -1:]
        return {"input_ids": step, "attention_mask": torch.ones_like(step), "cache": cache, "use_cache": True}

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        keep_training_weights: bool = False,
        **kwargs: Any,
    ) -> EveForCausalLM:
        """Load our checkpoints and the released EVE ones through `transformers` (meta-device
        init, sharded safetensors streamed into place, `device_map`, `torch_dtype`).

        Without a dtype the weights keep their stored dtype, fp16 promoted to fp32 (the official
        fp16 cast of bf16-trained weights can overflow). `device` is a shorthand for `device_map`.
        `keep_training_weights` keeps a stored v1 patch aligning layer in
        `pending_aligning_weights`, for a trainer to continue it. Missing or unexpected weights
        are a CheckpointError.
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        dtype = dtype if dtype is not None else kwargs.pop("torch_dtype", None)
        if dtype is None or dtype == "auto":
            dtype = stored_dtype(folder)
        if device is not None and kwargs.get("device_map") is None:
            kwargs["device_map"] = torch.device(device)
        config = kwargs.pop("config", None) or EveConfig.from_pretrained(folder)
        official_geometry(folder, config)
        want_info = kwargs.pop("output_loading_info", False)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one line in the log instead of a bar per load
        try:
            model, info = super().from_pretrained(
                folder, *model_args, config=config, dtype=dtype, output_loading_info=True, **kwargs
            )
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        logger.debug("loaded %s (%s)", folder, dtype)
        missing = sorted(set(info.get("missing_keys", ())) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
        all_unexpected = set(info.get("unexpected_keys", ()))
        training_only = stored_keys_with_prefix(folder, TRAINING_ONLY_PREFIXES)
        unexpected = sorted(k for k in all_unexpected if not k.startswith(TRAINING_ONLY_PREFIXES))
        mismatched = info.get("mismatched_keys", [])
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"checkpoint {folder} does not match its config ({config.version}, {config.family}): "
                f"missing keys {missing[:20]}; unexpected keys {unexpected[:20]}; mismatched {list(mismatched)[:20]}"
            )
        if training_only:
            logger.info(
                "ignoring %d training-only tensors (patch aligning layer / teacher) in %s", len(training_only), folder
            )
        if keep_training_weights:
            model.pending_aligning_weights = read_aligning_weights(folder)
        model.eval()
        return (model, info) if want_info else model

    def save_pretrained(  # type: ignore[override]
        self, path: str | Path, *, include_aligning_layer: bool = True, **kwargs: Any
    ) -> None:
        """Write config.json + model.safetensors atomically; other files in `path` are kept.

        With Hugging Face's options (`state_dict`, `max_shard_size`, ... as PEFT and the `Trainer`
        pass them) it is `PreTrainedModel.save_pretrained`.
        """
        self.config.architectures = [type(self).__name__]
        if kwargs:
            super().save_pretrained(path, **kwargs)
            return
        save_checkpoint(self.config, self.state_dict(), path, include_aligning_layer=include_aligning_layer)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def next_token_targets(spliced: Spliced) -> Tensor:
    """Next-token targets [B, L-1] of a spliced batch with labels: never across packed samples,
    nor across branches (a branch's first token is never a target)."""
    if spliced.labels is None:
        raise ValueError("next_token_targets needs a batch spliced with labels")
    targets = spliced.labels[:, 1:]
    if spliced.segments is not None:
        targets = targets.masked_fill(spliced.segments[:, 1:] != spliced.segments[:, :-1], IGNORE_INDEX)
    if spliced.branches is not None:
        targets = targets.masked_fill(spliced.branches[:, 1:] != spliced.branches[:, :-1], IGNORE_INDEX)
    return targets


def _run_starts(change: Tensor) -> Tensor:
    """Index of the first token of each token's run (`change` marks where a run begins)."""
    idx = torch.arange(change.shape[1], device=change.device).expand_as(change)
    return torch.where(change, idx, torch.zeros_like(idx)).cummax(dim=1).values


def token_positions(segments: Tensor, branches: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
    """RoPE positions: 0, 1, 2, ... restarting at each packed segment; with `branches`, every
    branch continues from the end of its segment's shared prefix (branch 0), as if it followed the
    prefix alone. The prefix must come first in its segment (ValueError otherwise)."""
    b, n = segments.shape
    idx = torch.arange(n, device=segments.device).expand(b, n)
    seg_change = torch.ones_like(segments, dtype=torch.bool)
    seg_change[:, 1:] = segments[:, 1:] != segments[:, :-1]
    if branches is None:
        return idx - _run_starts(seg_change)
    change = seg_change.clone()
    change[:, 1:] |= branches[:, 1:] != branches[:, :-1]
    within_run = idx - _run_starts(change)
    seg_start = _run_starts(seg_change)

    def count_in_segment(flags: Tensor) -> Tensor:  # flags seen so far in the token's segment, inclusive
        c = flags.long().cumsum(1)
        return c - c.gather(1, seg_start) + flags.long().gather(1, seg_start)

    is_prefix = branches == 0
    real = torch.ones_like(is_prefix) if valid is None else valid
    if bool((is_prefix & real & (count_in_segment(~is_prefix) > 0)).any()):
        raise ValueError("branch_ids: shared-prefix tokens (0) must come before every branch of their sample")
    return torch.where(is_prefix, within_run, count_in_segment(is_prefix) + within_run)
