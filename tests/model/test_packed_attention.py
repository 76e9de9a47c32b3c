"""Packed rows attend per document: the same logits, losses and gradients as the samples alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eve_vlm import EveConfig, EveForCausalLM
from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.model.attention import PackedLayout, QueryPositions, resolve_backend

IMG = IMAGE_TOKEN_INDEX
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_model(version: str, seed: int = 0) -> EveForCausalLM:
    torch.manual_seed(seed)
    config = EveConfig(
        version=version, family="qwen2" if version == "v2" else "llama", vocab_size=97, hidden_size=32,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vision_hidden_size=16, patch_stride=16 if version == "v2" else 14, merge_stride=2,
        modality_experts=version == "v2", attention_bias=version == "v2", eos_token_id=96,
    )
    model = EveForCausalLM(config)
    if version == "v2":  # vision copies that differ from the text weights, so routing matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "moe_" in name:
                    p.add_(0.3 * torch.randn_like(p))
    return model.train()


class GridTeacher(torch.nn.Module):
    """A frozen stand-in teacher: pooled pixels -> a fixed projection, [N, g, g, C]."""

    image_size, patch_size, hidden_size = 56, 14, 8
    image_mean = image_std = (0.5, 0.5, 0.5)

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, self.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(F.avg_pool2d(pixels, self.patch_size).permute(0, 2, 3, 1))


def samples(version: str, stride: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Text-only samples mixed with images of several sizes and aspect ratios."""
    g = torch.Generator().manual_seed(1)
    sizes = [(stride, 2 * stride), (2 * stride, stride), None, (2 * stride, 2 * stride), None, (stride, stride)]
    out = []
    for i, size in enumerate(sizes):
        text = torch.randint(3, 90, (3 + i,), generator=g)
        if size is None:
            out.append((text, []))
        else:
            ids = torch.cat([text[:1], torch.tensor([IMG]), text[1:]])
            out.append((ids, [torch.randn(3, *size, generator=g)]))
    return out


def labels_of(ids: torch.Tensor) -> torch.Tensor:
    lab = ids.masked_fill(ids < 0, IGNORE_INDEX)
    lab[0] = IGNORE_INDEX  # as the collators do: a sample's first token is never a target
    return lab


def teacher_inputs(images: list[torch.Tensor], stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image on a 56 px teacher canvas, and the valid band of its 4x4 grid."""
    pixels = torch.stack([F.pad(im, (0, 56 - im.shape[2], 0, 56 - im.shape[1])) for im in images])
    masks = torch.zeros(len(images), 4, 4, dtype=torch.bool)
    for i, im in enumerate(images):
        masks[i, : im.shape[1] // stride, : im.shape[2] // stride] = True
    return pixels, masks


def run(model, ids, images, labels, stride, teacher, **kw):
    extra = {}
    if teacher and images:
        extra["teacher_pixels"], extra["teacher_masks"] = teacher_inputs(images, stride)
    return model(ids, images=images or None, labels=labels, **extra, **kw)


def packed_batch(items, rows: list[list[int]]):
    """Rows of samples (indices into items), right-padded, with segment ids 1..k."""
    width = max(sum(items[i][0].numel() for i in row) for row in rows) + 2  # trailing padding
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    segs, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    images = []
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, start=1):
            t, ims = items[i]
            ids[r, at:at + t.numel()] = t
            labels[r, at:at + t.numel()] = labels_of(t)
            segs[r, at:at + t.numel()] = k
            mask[r, at:at + t.numel()] = 1
            images += ims
            at += t.numel()
    return ids, labels, segs, mask, images


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("return_logits", [True, False])
def test_packed_rows_equal_samples_one_by_one(version, return_logits):
    """Logits, LM loss (and v1's aligning loss) and every gradient of packed rows equal the same
    samples run alone (fp32, 1e-5); without logits the last layer runs on target positions only."""
    model = tiny_model(version)
    stride = model.config.token_stride
    teacher = version == "v1"
    if teacher:
        model.attach_aligning_layer(GridTeacher())
    items = samples(version, stride)
    rows = [[0, 2, 3], [1, 4, 5]]

    model.zero_grad()
    alone = [run(model, t[None], ims, labels_of(t)[None], stride, teacher) for t, ims in items]
    loss = sum(o.lm_loss_sum for o in alone)
    n_img = [len(ims) for _, ims in items]
    if teacher:  # the packed aligning loss is the mean over all images
        align = sum(o.aligning_loss * n for o, n in zip(alone, n_img, strict=True) if n) / sum(n_img)
        loss = loss + align
    loss.backward()
    grads_alone = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    ids, labels, segs, mask, images = packed_batch(items, rows)
    packed = run(model, ids, images, labels, stride, teacher, segment_ids=segs, attention_mask=mask,
                 return_logits=return_logits)
    assert packed.num_label_tokens == sum(o.num_label_tokens for o in alone)
    torch.testing.assert_close(packed.lm_loss_sum, sum(o.lm_loss_sum for o in alone), **TOL)
    total = packed.lm_loss_sum
    if teacher:
        torch.testing.assert_close(packed.aligning_loss, align, **TOL)
        total = total + packed.aligning_loss
    total.backward()
    for n, p in model.named_parameters():
        if n in grads_alone:
            torch.testing.assert_close(p.grad, grads_alone[n], rtol=1e-4, atol=5e-5, msg=lambda m, n=n: f"{n}: {m}")
    if return_logits:
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = alone[i].logits.shape[1]
                torch.testing.assert_close(packed.logits[r, at:at + n], alone[i].logits[0], **TOL)
                at += n


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["segments", "flex", "dense"])
def test_backends_agree_with_branches_padding_and_query_subsets(backend):
    """Every backend gives the dense block-diagonal result, with shared-prefix branches inside a
    document, padding, and a subset of query positions (flex runs forward-only on CPU)."""
    torch.manual_seed(0)
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 2, 2, 3, 3]])
    valid = seg != 0
    branches = torch.tensor([[0] * 10, [0, 0, 1, 1, 2, 2, 0, 0, 0, 0]])
    layout = PackedLayout.from_segments(seg, valid, branches, backend)
    assert layout.spans == [(0, 0, 3), (0, 3, 5), (1, 0, 6), (1, 6, 2), (1, 8, 2)]
    assert layout.branched == [False, False, True, False, False]
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask(), enable_gqa=True)
    got = layout.attend(q, k, v)
    torch.testing.assert_close(got[valid[:, None, :].expand_as(got[..., 0])], want[valid[:, None, :].expand_as(want[..., 0])], **TOL)
    # queries: positions 4, 7 of row 0 and 1, 5, 9 of row 1 (valid first, ascending)
    index = torch.tensor([[4, 7, 0], [1, 5, 9]])
    qv = torch.tensor([[True, True, False], [True, True, True]])
    queries = QueryPositions(index, qv)
    q_sub = q.gather(2, index[:, None, :, None].expand(-1, 4, -1, 8))
    want = F.scaled_dot_product_attention(q_sub, k, v, attn_mask=layout.dense_mask(queries), enable_gqa=True)
    got = layout.attend(q_sub, k, v, queries)
    sel = qv[:, None, :].expand(-1, 4, -1)
    torch.testing.assert_close(got[sel], want[sel], **TOL)


def test_dense_mask_is_the_document_rule():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = PackedLayout.from_segments(seg, seg != 0).dense_mask()[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees (at least) itself, so no row is empty
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_backend_choice_and_the_model_switch():
    assert resolve_backend("auto", torch.device("cpu")) == "segments"
    assert resolve_backend("dense", torch.device("cpu")) == "dense"
    with pytest.raises(ValueError, match="unknown packed attention backend 'fast'"):
        resolve_backend("fast", torch.device("cpu"))
    model = tiny_model("v2").eval()
    items = samples("v2", model.config.token_stride)
    ids, labels, segs, mask, images = packed_batch(items, [[0, 1, 2], [3, 4, 5]])
    outs = {}
    for backend in ("segments", "dense"):
        model.model.packed_attention = backend
        with torch.no_grad():
            outs[backend] = model(ids, images=images, labels=labels, segment_ids=segs, attention_mask=mask)
    torch.testing.assert_close(outs["segments"].lm_loss_sum, outs["dense"].lm_loss_sum, **TOL)
    valid = outs["dense"].valid
    torch.testing.assert_close(outs["segments"].logits[valid], outs["dense"].logits[valid], **TOL)


def test_segments_gradients_match_dense_with_padding_around_and_between_documents():
    """Per-document attention splits each row into documents and padding gaps (leading, between,
    trailing); its output and every input gradient equal the dense mask's at the real tokens."""
    torch.manual_seed(0)
    seg = torch.tensor([[0, 1, 1, 1, 0, 2, 2, 0, 0], [1, 1, 2, 2, 2, 2, 3, 3, 0]])
    valid = seg != 0
    layout = {b: PackedLayout.from_segments(seg, valid, backend=b) for b in ("segments", "dense")}
    assert layout["segments"].spans == [(0, 1, 3), (0, 5, 2), (1, 0, 2), (1, 2, 4), (1, 6, 2)]
    base = (torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8))
    weight = torch.randn(2, 4, 9, 8) * valid[:, None, :, None]  # the loss reads real tokens only
    outs, grads = {}, {}
    for name, lay in layout.items():
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = lay.attend(q, k, v)
        (out * weight).sum().backward()
        outs[name], grads[name] = out, (q.grad, k.grad, v.grad)
    real = valid[:, None, :, None].expand_as(outs["dense"])
    torch.testing.assert_close(outs["segments"][real], outs["dense"][real], **TOL)
    assert torch.all(outs["segments"][~real] == 0)  # padding queries: zeros, nothing reads them
    for got, want in zip(grads["segments"], grads["dense"], strict=True):
        torch.testing.assert_close(got, want, **TOL)
