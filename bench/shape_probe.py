"""How fast can the quickstart's patch embedding learn easy-VQA shapes, without the LLM in the way?

Why: with a short stage 1 the quickstart learns colour but not shape within the CPU budget. This
separates the patch embedding's capacity from its training signal: the real v1 patch embedding + projector (as the
quickstart builds it: 64 px, patch 8, 2x2 merge, width 256 -> 576) is trained directly with a
shape label, or distilled from the frozen EfficientNet teacher and then probed, with and without
the GELU after the patch conv. An attention-pooling classifier stands in for the decoder reading
the visual tokens. Prints test accuracy after a few step counts (one run; seed noise is a few
points).

    python bench/shape_probe.py            # about 4 minutes on two cores
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from eve_vlm.model.config import EveConfig
from eve_vlm.model.teacher_efficientnet import EfficientNetTeacher
from eve_vlm.model.vision import PatchEmbeddingV1, build_projector
from eve_vlm.quickstart.easy_vqa_data import dataset_pixel_stats, load_easy_vqa

CHECKPOINTS = (45, 100, 200, 400, 600)


def shape_images(split: str, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised pixels [N, 3, 64, 64], raw pixels in [0, 1], shape labels [N] (one per image)."""
    data = load_easy_vqa(split)
    label = {q.image_id: q.answer for q in data.questions if q.question_type == "shape"}
    ids = sorted(label)
    raw = np.stack([np.asarray(Image.open(data.image_paths[i]).convert("RGB"), dtype=np.float32) / 255 for i in ids])
    raw_t = torch.from_numpy(raw).permute(0, 3, 1, 2).contiguous()
    names = sorted(set(label.values()))
    return (raw_t - mean) / std, raw_t, torch.tensor([names.index(label[i]) for i in ids])


class AttentionPool(nn.Module):
    """One learned query over the visual tokens, then a linear classifier: a decoder's read-out."""

    def __init__(self, width: int, classes: int = 3) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, 4 if width % 4 == 0 else 1, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.attention(self.query.expand(len(tokens), -1, -1), tokens, tokens)
        return self.head(out[:, 0])


class PatchEmbedding(nn.Module):
    """The quickstart's v1 patch embedding + projector, returning [N, 21, 576] visual tokens."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        cfg = EveConfig(
            version="v1", family="llama", hidden_size=576, vision_hidden_size=256, patch_stride=8,
            merge_stride=2, patch_activation=activation,
        )
        self.tower = PatchEmbeddingV1(cfg)
        self.projector = build_projector(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        out = self.tower(list(pixels))
        return self.projector(out.tokens).view(len(pixels), -1, 576)

    def grid(self, pixels: Tensor) -> Tensor:
        """The 4x4 grid tokens (CLS and SPLIT dropped), [N, 16, 576]."""
        tokens = self.forward(pixels)[:, 1:].view(len(pixels), 4, 5, 576)
        return tokens[:, :, :4].reshape(len(pixels), 16, 576)


@torch.no_grad()
def teacher_grid(teacher: EfficientNetTeacher, raw: Tensor) -> Tensor:
    """The teacher's 4x4 features of raw [0, 1] pixels as [N, 16, C] (its own 0.5/0.5 normalisation)."""
    return torch.cat([teacher(teacher.normalize(raw[i : i + 256])) for i in range(0, len(raw), 256)]).flatten(1, 2)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)]).argmax(-1) == y).float().mean())


def train_probe(features_tr: Tensor, y_tr: Tensor, features_te: Tensor, y_te: Tensor, steps: int = 300) -> float:
    torch.manual_seed(0)
    probe = AttentionPool(features_tr.shape[-1])
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(features_tr), (32,), generator=gen)
        loss = F.cross_entropy(probe(features_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return accuracy(probe, features_te, y_te)


def supervised(activation: str, data, steps: int) -> list[str]:
    """Patch embedding + attention pooling trained end to end on the shape label."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(0)
    pe, pool = PatchEmbedding(activation), AttentionPool(576)
    model = nn.Sequential(pe, pool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen, out = torch.Generator().manual_seed(0), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_tr), (32,), generator=gen)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CHECKPOINTS:
            out.append(f"{step}: {100 * accuracy(model, x_te, y_te):.0f}%")
    return out


def distilled(activation: str, data, teacher_tr: Tensor, teacher_te: Tensor, steps: int) -> list[str]:
    """Patch embedding distilled from the teacher's 4x4 grid (cosine), then frozen and probed."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(0)
    pe = PatchEmbedding(activation)
    head = nn.Sequential(nn.LayerNorm(576), nn.Linear(576, teacher_tr.shape[-1]))
    opt = torch.optim.AdamW([*pe.parameters(), *head.parameters()], lr=1e-3)
    gen, out = torch.Generator().manual_seed(0), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_tr), (32,), generator=gen)
        loss = (1 - F.cosine_similarity(head(pe.grid(x_tr[idx])), teacher_tr[idx], dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CHECKPOINTS:
            with torch.no_grad():
                f_tr, f_te = pe.grid(x_tr), pe.grid(x_te)
            out.append(f"{step}: {100 * train_probe(f_tr, y_tr, f_te, y_te):.0f}%")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in dataset_pixel_stats("train"))
    x_tr, raw_tr, y_tr = shape_images("train", mean, std)
    x_te, raw_te, y_te = shape_images("test", mean, std)
    data = (x_tr, y_tr, x_te, y_te)
    teacher = EfficientNetTeacher.from_installed(stage="stride16", image_size=64)
    t_tr, t_te = teacher_grid(teacher, raw_tr), teacher_grid(teacher, raw_te)
    print(f"{len(x_tr)} train / {len(x_te)} test images with a shape question; test accuracy after N steps of 32")
    print(f"teacher 4x4x{t_tr.shape[-1]} features + attention pooling (300 steps): {100 * train_probe(t_tr, y_tr, t_te, y_te):.0f}%")
    for activation in ("none", "gelu"):
        t0 = time.perf_counter()
        print(f"supervised, patch_activation={activation}: {', '.join(supervised(activation, data, args.steps))}", end="")
        print(f"  ({time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        print(f"distilled then probed, patch_activation={activation}: {', '.join(distilled(activation, data, t_tr, t_te, args.steps))}", end="")
        print(f"  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
