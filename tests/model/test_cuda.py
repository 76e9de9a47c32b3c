"""The CUDA path (bf16 autocast + SDPA): same numbers as the CPU in fp32, close ones in bf16, and a
training stage that learns. Skipped where no GPU is present (CI); run on a GPU machine with
`python3 -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eve_vlm import EveForCausalLM
from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.generate import build_prompts, generate
from eve_vlm.model.attention import resolve_backend
from eve_vlm.processing import EveProcessor
from eve_vlm.testing import make_png, tiny_model_config
from eve_vlm.train import Recipe, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
IMAGES = [make_png(48, 32, (200, 30, 30), 0), make_png(20, 70, (0, 0, 200), 1), make_png(40, 40, (20, 180, 20), 2)]
QUESTIONS = ["<image>\nWhat is this?", "Describe <image> please.", "<image>\nHow many shapes?"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 would change fp32 results by ~1e-3; the parity checks need true fp32 on the GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(checkpoint folder, processor) of each tiny model: every test loads its own copy on its device."""
    return tiny_dir, EveProcessor.from_pretrained(tiny_dir)


def _batch(processor):
    return processor(build_prompts(processor, QUESTIONS), images=IMAGES, padding_side="left")


def _to(batch, device, image_dtype=None):
    """The processor's batch on `device`: tensors moved, the image list moved (and cast) image by image."""
    return {
        k: (v.to(device) if torch.is_tensor(v) else [t.to(device, image_dtype) for t in v]) for k, v in batch.items()
    }


def _logits(model, batch, device, dtype=None):
    inputs = _to(batch, device)
    ctx = torch.autocast("cuda", dtype=dtype) if dtype is not None else torch.autocast("cuda", enabled=False)
    with torch.no_grad(), ctx:
        out = model(**inputs, padding_side="left")
    return out.logits.float().cpu(), out.valid.cpu()


def test_fp32_logits_on_cuda_equal_cpu(tiny):
    path, processor = tiny
    batch = dict(_batch(processor))
    cpu_model = EveForCausalLM.from_pretrained(path).eval()
    gpu_model = EveForCausalLM.from_pretrained(path).eval().cuda()
    ref, valid = _logits(cpu_model, batch, "cpu")
    got, _ = _logits(gpu_model, batch, "cuda")
    assert (got[valid] - ref[valid]).abs().max().item() < 1e-4


def test_bf16_autocast_logits_track_fp32(tiny):
    path, processor = tiny
    batch = dict(_batch(processor))
    model = EveForCausalLM.from_pretrained(path).eval().cuda()
    ref, valid = _logits(model, batch, "cuda")
    got, _ = _logits(model, batch, "cuda", torch.bfloat16)
    ref, got = ref[valid], got[valid]
    cos = F.cosine_similarity(ref, got, dim=-1)
    assert cos.min().item() > 0.99, cos.min()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_greedy_generation_on_cuda_equals_cpu(tiny):
    path, processor = tiny
    batch = dict(_batch(processor))
    answers = {}
    for device in ("cpu", "cuda"):
        model = EveForCausalLM.from_pretrained(path).eval().to(device)
        inputs = _to(batch, device)
        res = generate(model, inputs["input_ids"], inputs["images"], inputs["attention_mask"], max_new_tokens=8)
        answers[device] = res.sequences
    assert answers["cuda"] == answers["cpu"]


def test_bf16_half_weights_generate(tiny):
    """Weights cast to bf16 (how a GPU server loads them) still generate the full length with the cache."""
    path, processor = tiny
    batch = dict(_batch(processor))
    model = EveForCausalLM.from_pretrained(path).eval().to("cuda", torch.bfloat16)
    inputs = _to(batch, "cuda", torch.bfloat16)
    res = generate(model, inputs["input_ids"], inputs["images"], inputs["attention_mask"], max_new_tokens=6, eos_token_id=[-1])
    assert all(len(t) == 6 for t in res.sequences)


@pytest.mark.parametrize("stage", ["eve_v1/2_pretrain", "eve_v2/3_sft"])
def test_tiny_stage_trains_on_cuda_in_bf16(tmp_path: Path, stage: str):
    recipe = Recipe.load(
        RECIPES / "tiny" / f"{stage}.yaml", [f"output_dir={tmp_path}", "max_steps=30", "device=cuda", "precision=auto"]
    )
    trainer = Trainer(recipe, progress=False)
    assert trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


def test_shared_prefix_branches_on_cuda_equal_cpu(tiny):
    """Independent-turn rows (boolean SDPA mask with branches) give the CPU's loss on the GPU."""
    path, processor = tiny
    from eve_vlm.processing import encode_independent_turns

    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red shape."},
            {"from": "human", "value": "How many shapes?"}, {"from": "gpt", "value": "One."}]
    ids, labels, branches = encode_independent_turns(conv, processor.tokenizer, processor.template, num_images=1)
    pixels = processor.image_processor([processor_image(IMAGES[0])])[0]
    inputs = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "branch_ids": torch.tensor([branches])}
    losses = []
    for device in ("cpu", "cuda"):
        model = EveForCausalLM.from_pretrained(path).to(device)
        with torch.no_grad():
            out = model(images=[pixels.to(device)], **{k: v.to(device) for k, v in inputs.items()})
        losses.append(out.lm_loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4, losses


def processor_image(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_packed_row_with_flex_attention_on_cuda_equals_cpu(version):
    """A packed row on the GPU (`auto`: compiled FlexAttention with a document block mask) gives the
    CPU's per-document logits, loss and gradients (fp32); images of two shapes and a text-only
    document share the row."""
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    torch.manual_seed(0)
    cfg = tiny_model_config(version, 97, hidden_size=128, intermediate_size=256)  # head_dim 32 for Triton
    s = cfg.token_stride
    g = torch.Generator().manual_seed(1)
    ids, segs, images = [], [], []
    for doc, (n, size) in enumerate([(5, (s, 2 * s)), (7, None), (4, (2 * s, s))], start=1):
        text = torch.randint(3, 90, (n,), generator=g)
        if size is not None:
            text = torch.cat([text[:1], torch.tensor([IMAGE_TOKEN_INDEX]), text[1:]])
            images.append(torch.randn(3, *size, generator=g))
        ids.append(text)
        segs.append(torch.full_like(text, doc))
    ids, segs = torch.cat(ids)[None], torch.cat(segs)[None]
    labels = ids.masked_fill(ids < 0, IGNORE_INDEX)
    labels[segs != segs.roll(1, dims=1)] = IGNORE_INDEX  # a document's first token is never a target

    cpu = EveForCausalLM(cfg).train()
    gpu = copy.deepcopy(cpu).cuda()
    outs = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        images_on = [im.to(dev) for im in images]
        out = model(ids.to(dev), images=images_on, labels=labels.to(dev), segment_ids=segs.to(dev))
        out.lm_loss_sum.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].lm_loss_sum.cpu(), outs[0].lm_loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1].logits.cpu(), outs[0].logits, rtol=1e-4, atol=1e-4)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p_cpu.grad is not None:
            torch.testing.assert_close(
                p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
            )
