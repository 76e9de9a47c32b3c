"""CUDA path check (run where a GPU is present): bf16 + SDPA forward, generation and a training step.

Prints the max |logit| difference between CUDA bf16 and CPU fp32 for tiny random v1 / v2 models,
whether batched generation equals per-sample generation on CUDA, and the loss curve of a few
bf16-autocast training steps of the tiny v1 recipe (aligning layer included).
"""

from __future__ import annotations

import tempfile

import torch

from eve_vlm import EveConfig, EveForCausalLM
from eve_vlm.constants import IMAGE_TOKEN_INDEX as IMG
from eve_vlm.generate import generate


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    for version in ("v1", "v2"):
        torch.manual_seed(0)
        cfg = EveConfig(
            version=version, family="llama" if version == "v1" else "qwen2", vocab_size=512, hidden_size=256,
            intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            vision_hidden_size=64, patch_stride=14 if version == "v1" else 16, merge_stride=2,
            modality_experts=version == "v2", attention_bias=version == "v2",
        )
        cpu = EveForCausalLM(cfg).eval()
        s = cfg.token_stride
        ids = torch.tensor([[5, 6, IMG, 7, 8, 9]])
        imgs = [torch.randn(3, 2 * s, 3 * s)]
        ref = cpu(ids, images=imgs).logits
        gpu = EveForCausalLM(cfg).eval()
        gpu.load_state_dict(cpu.state_dict())
        gpu.to("cuda", torch.bfloat16)
        out = gpu(ids.cuda(), images=imgs).logits.float().cpu()
        print(f"{version}: max |logit diff| cuda-bf16 vs cpu-fp32 = {(out - ref).abs().max():.4f} (logit scale {ref.abs().max():.2f})")
        rows = [(torch.tensor([[3, IMG, 4, 5]]), [torch.randn(3, 2 * s, s)]), (torch.tensor([[7, 8, 9, 10, 11, IMG, 13]]), [torch.randn(3, s, 3 * s)])]
        singles = [generate(gpu, i, im, max_new_tokens=6, eos_token_id=[-1]).sequences[0] for i, im in rows]
        ids_b = torch.zeros(2, 7, dtype=torch.long)
        mask = torch.zeros_like(ids_b)
        for r, (i, _) in enumerate(rows):
            ids_b[r, 7 - i.shape[1]:] = i[0]
            mask[r, 7 - i.shape[1]:] = 1
        batched = generate(gpu, ids_b, [im for _, ims in rows for im in ims], mask, max_new_tokens=6, eos_token_id=[-1]).sequences
        print(f"{version}: cuda batched == per-sample: {batched == singles}")

    from eve_vlm.train import Recipe, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Recipe.load("tiny/eve_v1/1_prealign", [f"output_dir={tmp}", "device=auto", "precision=bf16"])
        result = Trainer.from_recipe(recipe, progress=False).train()
        print("tiny v1 stage 1 on CUDA bf16, losses:", [round(h["loss"], 3) for h in result.history])


if __name__ == "__main__":
    main()
