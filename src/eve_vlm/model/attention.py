"""Attention over packed rows: each document attends to itself only, at the cost of its own length.

Why: a packed row of documents of lengths l_i needs sum(l_i^2) attention work, but SDPA with a
dense block-diagonal [L, L] mask computes all L^2 scores and throws most away (and on CUDA a dense
mask rules out the flash kernels). The decoder hands the packing layout (`PackedLayout`, built
once per forward from the segment ids), never a mask, to one entry point, `PackedLayout.attend`,
which runs one of these backends:

- ``segments``: one causal SDPA call per document (the CPU default: FlexAttention has no
  backward on CPU in torch 2.13, so it cannot train there).
- ``flex``: FlexAttention with a document block mask (the CUDA default): one kernel for the
  whole batch that skips the blocks outside every document.
- ``dense``: the block-diagonal mask through plain SDPA, as a reference and for benchmarks.

Inside a document attention is causal; with shared-prefix branches a branch sees the prefix and
itself (`build_attention_mask` states the same rule for unpacked rows). Padding outputs are zeros
(``segments``) or attend within the padding: nothing real ever reads them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

RowPlan = tuple[list[int], list[int], list[int]]  # query split sizes, key split sizes, document per piece
PackedBackend = Literal["auto", "segments", "flex", "dense"]
BACKENDS = ("auto", "segments", "flex", "dense")


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that runs: `auto` picks flex on CUDA (when this torch has it), else segments."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown packed attention backend {requested!r} (choose from {', '.join(BACKENDS)})")
    if requested != "auto":
        return requested
    return "flex" if device.type == "cuda" and flex_available() else "segments"


@functools.cache
def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class QueryPositions:
    """The query positions a layer computes when not every position's output is read ([B, Lq])."""

    index: Tensor  # [B, Lq] positions of the queries, the valid ones first and ascending
    valid: Tensor  # [B, Lq] bool


@dataclass
class PackedLayout:
    """Where the documents of packed rows lie, built once per forward and shared by all layers."""

    doc_ids: Tensor  # [B, L] long: a document number unique in the batch per token, -1 on padding
    branches: Tensor | None  # [B, L] shared-prefix branch ids (0 = prefix), or None
    spans: list[tuple[int, int, int]]  # (row, start, length) of every document, row-major
    branched: list[bool]  # per document: does it hold any branch (then it needs a small mask)
    backend: str = "segments"
    _block_masks: dict = field(default_factory=dict, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_segments(cls, segment_ids: Tensor, valid: Tensor, branch_ids: Tensor | None = None,
                      backend: str = "segments") -> PackedLayout:
        """Documents are the runs of equal, non-zero segment ids over valid tokens (one host sync)."""
        if segment_ids.shape != valid.shape:
            raise ValueError(f"segment_ids {tuple(segment_ids.shape)} and the token mask {tuple(valid.shape)} differ")
        b, n = segment_ids.shape
        seg = segment_ids.long().masked_fill(~valid.bool(), 0)
        start = seg != 0
        start[:, 1:] &= seg[:, 1:] != seg[:, :-1]
        doc_ids = (start.reshape(-1).long().cumsum(0) - 1).view(b, n).masked_fill(seg == 0, -1)
        rows, cols = start.nonzero(as_tuple=True)
        n_docs = int(rows.numel())
        lengths = torch.zeros(n_docs, dtype=torch.long, device=seg.device)
        lengths.index_add_(0, doc_ids[seg != 0], torch.ones_like(doc_ids[seg != 0]))
        stacked = [rows, cols, lengths]
        if branch_ids is not None:
            has = torch.zeros(n_docs, dtype=torch.long, device=seg.device)
            real = seg != 0
            has.index_add_(0, doc_ids[real], (branch_ids[real] != 0).long())
            stacked.append(has)
        host = torch.stack(stacked).tolist()
        spans = list(zip(host[0], host[1], host[2], strict=True))
        branched = [c > 0 for c in host[3]] if branch_ids is not None else [False] * n_docs
        return cls(doc_ids, branch_ids if any(branched) else None, spans, branched, backend)

    # ------------------------------------------------------------------ the entry point
    def attend(self, q: Tensor, k: Tensor, v: Tensor, queries: QueryPositions | None = None) -> Tensor:
        """q [B, H, Lq, hd], k/v [B, Hkv, L, hd] (RoPE applied) -> [B, H, Lq, hd].

        `queries` says which positions q holds when it is not every position (the last layer of a
        training forward computes only the positions with a target)."""
        gqa = q.shape[1] != k.shape[1]
        if self.backend == "segments":
            return self._segments(q, k, v, queries, gqa)
        if self.backend == "flex":
            return self._flex(q, k, v, queries, gqa)
        if self.backend == "dense":
            mask = self.dense_mask(queries)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        raise ValueError(f"unknown packed attention backend {self.backend!r}")

    # ------------------------------------------------------------------ rules
    def _allowed(self, q_pos: Tensor, k_pos: Tensor, rows: Tensor | int) -> Tensor:
        """The attention rule for positions (broadcasting): same document, causal, branch rule;
        every query sees itself, so no row is empty."""
        dq, dk = self.doc_ids[rows, q_pos], self.doc_ids[rows, k_pos]
        ok = (dq == dk) & (k_pos <= q_pos)
        if self.branches is not None:
            bq, bk = self.branches[rows, q_pos], self.branches[rows, k_pos]
            ok = ok & ((bk == 0) | (bq == bk))
        return ok | (k_pos == q_pos)

    def dense_mask(self, queries: QueryPositions | None = None) -> Tensor:
        """The block-diagonal [B, 1, Lq, L] bool mask (the `dense` reference)."""
        b, n = self.doc_ids.shape
        device = self.doc_ids.device
        q_pos = (torch.arange(n, device=device).expand(b, n) if queries is None else queries.index)[:, :, None]
        k_pos = torch.arange(n, device=device)[None, None, :]
        rows = torch.arange(b, device=device)[:, None, None]
        return self._allowed(q_pos, k_pos, rows)[:, None]

    # ------------------------------------------------------------------ backends
    def _segments(self, q: Tensor, k: Tensor, v: Tensor, queries: QueryPositions | None, gqa: bool) -> Tensor:
        """One SDPA per document on `split` views of each row; the row is `cat` back (zeros where
        nothing is read). Why split, not slicing: the backward of one split is one `cat`, while each
        slice's backward writes a zero-filled copy of the whole row (documents x layers of them)."""
        b = q.shape[0]
        plans, ranges = self._row_plans(queries)
        rows = []
        for r in range(b):
            qr, kr, vr = (q, k, v) if b == 1 else (q[r:r + 1], k[r:r + 1], v[r:r + 1])
            q_sizes, k_sizes, docs = plans[r]
            outs = []
            for qd, kd, vd, d in zip(qr.split(q_sizes, 2), kr.split(k_sizes, 2), vr.split(k_sizes, 2), docs,
                                     strict=True):
                if qd.shape[2] == 0:
                    continue
                if d < 0:  # queries outside every document (padding): nothing reads them
                    outs.append(torch.zeros_like(qd))
                elif queries is None and not self.branched[d]:
                    outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa))
                else:
                    outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self._doc_mask(d, queries, ranges[d]),
                                                               enable_gqa=gqa))
            rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
        return rows[0] if b == 1 else torch.cat(rows, dim=0)

    def _row_plans(self, queries: QueryPositions | None) -> tuple[list[RowPlan], list[tuple[int, int]]]:
        """Per row: the split sizes of its queries and of its keys, and the document of each piece
        (-1: padding); and each document's query range. Built once per forward (per query layout)
        and shared by every layer."""
        key = None if queries is None else id(queries)
        if key in self._plans:
            return self._plans[key]
        b, n = self.doc_ids.shape
        lq = n if queries is None else queries.index.shape[1]
        ranges = self._query_ranges(queries)
        plans: list[RowPlan] = [([], [], []) for _ in range(b)]
        q_at, k_at = [0] * b, [0] * b
        for d, (row, start, length) in enumerate(self.spans):
            q_sizes, k_sizes, docs = plans[row]
            q0, q1 = ranges[d]
            if q0 > q_at[row] or start > k_at[row]:  # padding before the document
                q_sizes.append(q0 - q_at[row])
                k_sizes.append(start - k_at[row])
                docs.append(-1)
            q_sizes.append(q1 - q0)
            k_sizes.append(length)
            docs.append(d)
            q_at[row], k_at[row] = q1, start + length
        for row, (q_sizes, k_sizes, docs) in enumerate(plans):
            if q_at[row] < lq or k_at[row] < n:
                q_sizes.append(lq - q_at[row])
                k_sizes.append(n - k_at[row])
                docs.append(-1)
        self._plans[key] = plans, ranges
        return plans, ranges

    def _doc_mask(self, d: int, queries: QueryPositions | None, q_range: tuple[int, int]) -> Tensor:
        """The [lq_d, l_d] mask of one document whose rule is more than causal (branches), or whose
        queries are a subset of its positions."""
        row, start, length = self.spans[d]
        q0, q1 = q_range
        device = self.doc_ids.device
        q_pos = torch.arange(q0, q1, device=device) if queries is None else queries.index[row, q0:q1]
        k_pos = torch.arange(start, start + length, device=device)
        return self._allowed(q_pos[:, None], k_pos[None, :], row)

    def _query_ranges(self, queries: QueryPositions | None) -> list[tuple[int, int]]:
        """Per document, the [q0, q1) range of q's positions that belong to it (one host sync)."""
        if queries is None:
            return [(start, start + length) for _, start, length in self.spans]
        if not self.spans:
            return []
        # valid queries come first in each row, ascending: a document's queries are contiguous
        idx = queries.index.masked_fill(~queries.valid, self.doc_ids.shape[1])
        rows = torch.tensor([s[0] for s in self.spans], device=idx.device)
        starts = torch.tensor([s[1] for s in self.spans], device=idx.device)
        ends = starts + torch.tensor([s[2] for s in self.spans], device=idx.device)
        sorted_rows = idx[rows].contiguous()
        q0 = torch.searchsorted(sorted_rows, starts[:, None].contiguous()).squeeze(1)
        q1 = torch.searchsorted(sorted_rows, ends[:, None].contiguous()).squeeze(1)
        host = torch.stack((q0, q1)).tolist()
        return list(zip(host[0], host[1], strict=True))

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, queries: QueryPositions | None, gqa: bool) -> Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = self._block_mask(queries, q.shape[2])
        fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
        return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    def _block_mask(self, queries: QueryPositions | None, lq: int):
        """The document block mask, built once per forward per query layout."""
        key = None if queries is None else id(queries)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            b, n = self.doc_ids.shape
            index = None if queries is None else queries.index

            def mask_mod(bi, hi, qi, ki):
                q_pos = qi if index is None else index[bi, qi]
                return self._allowed(q_pos, ki, bi)

            device = self.doc_ids.device
            self._block_masks[key] = create_block_mask(mask_mod, b, None, lq, n, device=device,
                                                       _compile=device.type == "cuda")
        return self._block_masks[key]


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (uncompiled it materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)
