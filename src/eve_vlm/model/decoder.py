"""The one decoder: Llama / Qwen2 layers with optional modality-specific (EVEv2) copies.

Families differ only by config values. EVEv2's vision copies of the norms, q/k/v/o projections
and MLP are applied by *routing*: visual tokens are gathered and sent through the vision weights,
text tokens through the text weights, and the results are put back in order. The official code
evaluates both branches on every token and blends them (twice the FLOPs, and an inf/NaN in the
unused branch poisons the token, since inf * 0 = NaN); we never do that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import PackedLayout, QueryPositions, resolve_backend
from .config import ConfigError, EveConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Llama/Qwen2 do, then cast back."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: EveConfig) -> Tensor:
    """Inverse frequencies, with Llama-3 style or linear scaling when the config asks for it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, config: EveConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin of shape [B, L, head_dim] for integer positions [B, L]."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, L, hd]; cos/sin: [B, L, hd]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


@dataclass
class TokenRoute:
    """Which flattened tokens are visual; built once per forward and shared by all layers."""

    text_index: Tensor  # [Nt] indices into the flattened [B*L] tokens
    vision_index: Tensor  # [Nv]
    inverse: Tensor  # [B*L]: position of each token in cat(text, vision)

    @classmethod
    def from_mask(cls, visual_mask: Tensor | None) -> TokenRoute | None:
        """None when no token is visual (text-only batches and decode steps use the text weights)."""
        if visual_mask is None:
            return None
        flat = visual_mask.reshape(-1)
        vision_index = flat.nonzero().squeeze(1)
        if vision_index.numel() == 0:
            return None
        text_index = (~flat).nonzero().squeeze(1)
        order = torch.cat((text_index, vision_index))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return cls(text_index, vision_index, inverse)

    def apply(self, x: Tensor, text_fn: Callable, vision_fn: Callable) -> Tensor | tuple[Tensor, ...]:
        """Run text_fn on text tokens and vision_fn on visual tokens of x [B, L, D]; keep order."""
        b, n = x.shape[:2]
        flat = x.reshape(b * n, -1)
        out_t = text_fn(flat.index_select(0, self.text_index)) if self.text_index.numel() else None
        out_v = vision_fn(flat.index_select(0, self.vision_index))
        single = not isinstance(out_v, tuple)
        outs_v = (out_v,) if single else out_v
        outs_t = (None,) * len(outs_v) if out_t is None else ((out_t,) if single else out_t)
        merged = []
        for t, v in zip(outs_t, outs_v, strict=True):
            joined = v if t is None else torch.cat((t, v), dim=0)
            merged.append(joined.index_select(0, self.inverse).reshape(b, n, -1))
        return merged[0] if single else tuple(merged)


def _routed(route: TokenRoute | None, x: Tensor, text_fn: Callable, vision_fn: Callable | None):
    if route is None or vision_fn is None:
        return text_fn(x)
    return route.apply(x, text_fn, vision_fn)


class MLP(nn.Module):
    def __init__(self, config: EveConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query attention through SDPA; q/k/v/o optionally duplicated for visual tokens."""

    def __init__(self, config: EveConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, bias = config.hidden_size, config.attention_bias
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, q_out, bias=bias)
        self.k_proj = nn.Linear(d, kv_out, bias=bias)
        self.v_proj = nn.Linear(d, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, d, bias=False)
        if config.modality_experts:
            self.moe_q_proj = nn.Linear(d, q_out, bias=bias)
            self.moe_k_proj = nn.Linear(d, kv_out, bias=bias)
            self.moe_v_proj = nn.Linear(d, kv_out, bias=bias)
            self.moe_o_proj = nn.Linear(q_out, d, bias=False)

    def project_text(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def project_vision(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.moe_q_proj(h), self.moe_k_proj(h), self.moe_v_proj(h)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext, rows: QueryRows | None = None) -> Tensor:
        """Joint causal attention over all tokens (shared by both modalities); returns [B, L, H*hd],
        or [N, H*hd] for the queries `rows` selects (keys and values, and the cache, stay complete)."""
        b, n = q.shape[:2]
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_index, k, v)
        if ctx.layout is not None:  # packed rows: per-document attention, no dense mask
            cos, sin = ctx.cos, ctx.sin
            queries = None
            if rows is not None:
                q, cos, sin = rows.gather(q), rows.gather(cos), rows.gather(sin)
                queries = QueryPositions(rows.index, rows.valid)
            lq = q.shape[1]
            q = apply_rope(q.view(b, lq, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
            out = ctx.layout.attend(q, k, v, queries)
            out = out.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim)
            return out if rows is None else out[rows.valid]
        cos, sin, mask, is_causal = ctx.cos, ctx.sin, ctx.attn_mask, ctx.is_causal
        if rows is not None:
            q, cos, sin = rows.gather(q), rows.gather(cos), rows.gather(sin)
            mask, is_causal = rows.mask(ctx.attn_mask, ctx.is_causal, k.shape[2]), False
        lq = q.shape[1]
        q = apply_rope(q.view(b, lq, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = out.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim)
        return out if rows is None else out[rows.valid]


@dataclass
class QueryRows:
    """The positions whose outputs the last layer must compute, as a padded [B, Lq] index.

    Why: a training loss reads the final hidden states only where there is a target (an answer's
    few tokens among a question's and an image's), and a prefill only at the last position. The
    last layer still writes keys and values for every token, but its attention queries, output
    projection and MLP run on the kept positions only: exact, and in the quickstart's 4-layer
    stage 3 about a fifth of a training step.
    """

    index: Tensor  # [B, Lq] positions, the kept ones of each row first, in order
    valid: Tensor  # [B, Lq] bool: a kept position (the rest pads rows with fewer)

    @classmethod
    def from_keep(cls, keep: Tensor) -> QueryRows:
        counts = keep.sum(1)
        lq = max(int(counts.max()), 1)
        index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :lq]
        valid = torch.arange(lq, device=keep.device)[None, :] < counts[:, None]
        return cls(index, valid)

    def gather(self, t: Tensor) -> Tensor:
        """Rows of t [B, L, ...] at the kept positions: [B, Lq, ...]."""
        idx = self.index.view(*self.index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        return t.gather(1, idx)

    def mask(self, attn_mask: Tensor | None, is_causal: bool, num_keys: int) -> Tensor | None:
        """The attention mask rows of the kept queries ([B, 1, Lq, Lk] bool)."""
        if attn_mask is not None:
            return attn_mask.gather(2, self.index[:, None, :, None].expand(-1, 1, -1, attn_mask.shape[-1]))
        if not is_causal:  # every query sees every key (a decode step)
            return None
        keys = torch.arange(num_keys, device=self.index.device)
        return (keys[None, None, None, :] <= self.index[:, None, :, None])


class DecoderLayer(nn.Module):
    def __init__(self, config: EveConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.has_experts = config.modality_experts
        if self.has_experts:
            self.moe_mlp = MLP(config)
            self.moe_input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.moe_post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, ctx: ForwardContext, keep: Tensor | None = None) -> Tensor:
        """[B, L, D] -> [B, L, D]; with a bool `keep` [B, L], only the kept positions' outputs: [N, D]."""
        route = ctx.route if self.has_experts else None
        attn = self.self_attn
        q, k, v = _routed(
            route,
            x,
            lambda h: attn.project_text(self.input_layernorm(h)),
            (lambda h: attn.project_vision(self.moe_input_layernorm(h))) if self.has_experts else None,
        )
        if keep is None:
            mixed = attn.attend(q, k, v, ctx)
        else:
            mixed = attn.attend(q, k, v, ctx, QueryRows.from_keep(keep))[None]  # [1, N, H*hd]
            x = x[keep][None]
            route = ctx.kept_route if self.has_experts else None
        x = x + _routed(route, mixed, attn.o_proj, attn.moe_o_proj if self.has_experts else None)
        x = x + _routed(
            route,
            x,
            lambda h: self.mlp(self.post_attention_layernorm(h)),
            (lambda h: self.moe_mlp(self.moe_post_attention_layernorm(h))) if self.has_experts else None,
        )
        return x if keep is None else x[0]


@dataclass
class ForwardContext:
    """Per-forward state shared by every layer (computed once, not per layer)."""

    cos: Tensor
    sin: Tensor
    attn_mask: Tensor | None
    is_causal: bool
    route: TokenRoute | None
    cache: KVCache | None
    kept_route: TokenRoute | None = None  # the route of the kept positions (see `run_layers`' keep)
    layout: PackedLayout | None = None  # packed rows: where each document lies (then no attn_mask)


class KVCache:
    """Pre-allocated key/value cache with a per-row validity mask and next position.

    Rows may be left-padded (batched prompts of different lengths): `valid` marks real keys,
    `next_position` is the RoPE position the next token of each row gets.
    """

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.length = 0
        self.valid: Tensor | None = None  # [B, length] bool
        self.next_position: Tensor | None = None  # [B]
        self._pending = 0

    def begin(self, new_valid: Tensor) -> None:
        """Register the validity of the tokens the coming forward appends (call before layers run)."""
        self.valid = new_valid if self.valid is None else torch.cat((self.valid, new_valid), dim=1)
        self._pending = new_valid.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        start = self.length
        end = start + k.shape[2]
        if layer >= len(self.keys):
            cap = max(end, 256)
            shape = (k.shape[0], k.shape[1], cap, k.shape[3])
            self.keys.append(k.new_empty(shape))
            self.values.append(v.new_empty(shape))
        if end > self.keys[layer].shape[2]:
            cap = max(end, 2 * self.keys[layer].shape[2])
            self.keys[layer] = _grow(self.keys[layer], cap, start)
            self.values[layer] = _grow(self.values[layer], cap, start)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self) -> None:
        """Advance the length once every layer has written the step's keys."""
        self.length += self._pending
        self._pending = 0

    @property
    def batch_size(self) -> int:
        return 0 if self.valid is None else self.valid.shape[0]

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        if self.valid is not None:
            self.valid = self.valid[rows]
        if self.next_position is not None:
            self.next_position = self.next_position[rows]


def _grow(t: Tensor, capacity: int, used: int) -> Tensor:
    out = t.new_empty((t.shape[0], t.shape[1], capacity, t.shape[3]))
    out[:, :, :used] = t[:, :, :used]
    return out


def build_attention_mask(
    query_valid: Tensor,
    past_valid: Tensor | None,
    segment_ids: Tensor | None,
    branch_ids: Tensor | None = None,
) -> tuple[Tensor | None, bool]:
    """Boolean SDPA mask [B, 1, Lq, Lk] (True = attend) and whether plain `is_causal` suffices.

    Keys are the cached keys followed by the new ones. A query attends to earlier valid keys of
    its own segment (packing) and, with `branch_ids`, only to the shared prefix (0) and its own
    branch; always to itself, so padding rows never produce NaN.
    """
    b, lq = query_valid.shape
    lp = 0 if past_valid is None else past_valid.shape[1]
    all_valid = bool(query_valid.all()) and (past_valid is None or bool(past_valid.all()))
    if segment_ids is None and branch_ids is None and all_valid:
        if lp == 0:
            return None, lq > 1
        if lq == 1:
            return None, False
    device = query_valid.device
    key_valid = query_valid if past_valid is None else torch.cat((past_valid, query_valid), dim=1)
    q_pos = torch.arange(lq, device=device)[:, None] + lp
    k_pos = torch.arange(lp + lq, device=device)[None, :]
    mask = (k_pos <= q_pos)[None] & key_valid[:, None, :]
    if segment_ids is not None:
        if lp:
            raise ValueError("packed sequences (segment_ids) cannot be combined with a KV cache")
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if branch_ids is not None:
        if lp:
            raise ValueError("shared-prefix branches (branch_ids) cannot be combined with a KV cache")
        mask = mask & ((branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :]))
    mask = mask | (k_pos == q_pos)[None]
    return mask.view(b, 1, lq, lp + lq), False


class Decoder(nn.Module):
    """Embeddings, layers and final norm, with the Hugging Face parameter names."""

    def __init__(self, config: EveConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        # How packed rows attend (`attention.py`): auto = flex on CUDA, one SDPA per document on CPU.
        self.packed_attention = "auto"

    def run_layers(
        self,
        embeds: Tensor,
        positions: Tensor,
        query_valid: Tensor,
        *,
        visual_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        branch_ids: Tensor | None = None,
        cache: KVCache | None = None,
        collect: frozenset[int] = frozenset(),
        keep: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run every layer; returns the final-normed hidden states and the requested hidden states.

        `collect` uses the Hugging Face `hidden_states` indexing: 0 = embeddings, k = output of layer
        k, num_layers = after the final norm. Only the requested ones are kept (stacking every layer's
        hidden states for the whole sequence would cost gigabytes at 7B).
        With a bool `keep` [B, L], the final hidden states are those of the kept positions only,
        [N, D] in row-major order (`x[keep]`), and the last layer computes no others (`QueryRows`).
        """
        n_layers = len(self.layers)
        if keep is not None and n_layers in collect:
            raise ValueError("the final hidden states cannot be both collected in full and kept in part")
        past_valid = None if cache is None else cache.valid
        layout = None
        if segment_ids is not None and cache is None:
            backend = resolve_backend(self.packed_attention, embeds.device)
            layout = PackedLayout.from_segments(segment_ids, query_valid, branch_ids, backend)
            attn_mask, is_causal = None, False
        else:
            attn_mask, is_causal = build_attention_mask(query_valid, past_valid, segment_ids, branch_ids)
        cos, sin = self.rotary_emb(positions, embeds.dtype)
        if cache is not None:
            cache.begin(query_valid)
        ctx = ForwardContext(cos, sin, attn_mask, is_causal, TokenRoute.from_mask(visual_mask), cache, layout=layout)
        if keep is not None and visual_mask is not None:
            ctx.kept_route = TokenRoute.from_mask(visual_mask[keep][None])
        kept: dict[int, Tensor] = {}
        x = embeds
        if 0 in collect:
            kept[0] = x
        for i, layer in enumerate(self.layers):
            part = keep if i + 1 == n_layers else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, ctx, part, use_reentrant=False)
            else:
                x = layer(x, ctx, part)
            if i + 1 in collect and i + 1 != len(self.layers):
                kept[i + 1] = x
        x = self.norm(x)
        if len(self.layers) in collect:
            kept[len(self.layers)] = x
        if cache is not None:
            cache.commit()
        return x, kept
