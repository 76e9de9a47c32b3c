"""`eve profile`: the paper's table, FlopCounterMode cross-checks, meta-device parameter counts, the CLI."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from eve_vlm import testing
from eve_vlm.cli import main as cli_main
from eve_vlm.constants import IMAGE_TOKEN_INDEX
from eve_vlm.eval.profile import (
    PAPER,
    PAPER_ROWS,
    STANDARD,
    ClipVisionSpec,
    Convention,
    ProfileTarget,
    builtin_targets,
    clip_vision_macs,
    clip_vision_params,
    decoder_macs,
    load_target,
    measure_latency,
    meta_model,
    paper_comparison,
    parameter_counts,
    profile,
    split_parameters,
    visual_geometry,
)
from eve_vlm.model import EveConfig, EveForCausalLM
from eve_vlm.processing import EveImageConfig, EveImageProcessor
from eve_vlm.testing import tiny_model_config

torch.set_num_threads(1)


def tiny_config(version: str, **kw) -> EveConfig:
    return tiny_model_config(version, 300, intermediate_size=96, **kw)


def tiny_image_config(version: str) -> EveImageConfig:
    """The factory's image geometry, v2 up to 96 px so that small images give several rows of tokens."""
    config = testing.tiny_image_config(version)
    return config.replace(max_size=96) if version == "v2" else config


def tiny_target(version: str, **kw) -> ProfileTarget:
    return ProfileTarget(f"tiny-{version}", "tiny", tiny_config(version, **kw), tiny_image_config(version))


# ------------------------------------------------------------------------------- the paper's table


def test_paper_rows_within_ten_percent():
    rows = paper_comparison()
    assert [(r["row"], r["column"]) for r in rows] == [(r.row, r.column) for r in PAPER_ROWS]
    for r in rows:
        assert abs(r["relative_diff"]) < 0.10, r
    by_key = {(r["row"], r["column"]): r for r in rows}
    # The found convention: square images at the native size, no prompt.
    assert by_key[("EVE-7B", "llm")]["image_size"] == [672, 672]
    assert by_key[("EVE-7B-HD", "vision")]["image_size"] == [1344, 1344]
    assert by_key[("LLaVA-1.5", "vision")]["image_size"] == [336, 336]


def test_standard_convention_halves_the_papers_llm_column():
    """The documented exception: under 2 FLOPs/MAC the LLM column is about half the paper's value."""
    prof = profile(builtin_targets()["eve-7b-v1"], convention=STANDARD)
    assert 0.45 < prof.llm_flops / 15.2e12 < 0.56
    assert abs(prof.vision_flops / 42e9 - 1) < 0.05  # the vision column needs no special convention


def test_seven_b_parameter_counts_match_the_base_models():
    targets = builtin_targets()
    v1 = profile(targets["eve-7b-v1"])
    assert v1.llm_params == 6_738_415_616  # Vicuna-7B / Llama-2-7B
    assert v1.visual_tokens == 601 and v1.grid == (24, 24)
    hd = profile(targets["eve-7b-hd-v1"])
    assert hd.visual_tokens == 2353 and hd.vision_params == v1.vision_params
    v2 = profile(targets["eve-7b-hd-v2"])
    assert v2.llm_text_path_params == 7_615_616_512  # Qwen2.5-7B
    assert v2.llm_params > 1.8 * v2.llm_text_path_params  # + a vision copy of every layer
    llava = profile(targets["llava-1.5-7b"])
    assert llava.visual_tokens == 576
    assert clip_vision_params(ClipVisionSpec(), 4096)["encoder"] == 303_507_456  # CLIP ViT-L/14-336


# ------------------------------------------------------------------------------- FLOP cross-checks


def _counted(model: torch.nn.Module, *args, **kwargs) -> dict[str, int]:
    """FlopCounterMode totals per top-level part; the math SDPA backend so attention is counted."""
    model.requires_grad_(False)  # (no_grad trips FlopCounterMode's module tracker on expanded parameters)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=None) as fc:
        model(*args, **kwargs)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    name = type(model).__name__
    vision = sum(counts.get(f"{name}.model.{part}", 0) for part in ("vision_tower", "mm_projector"))
    return {"total": fc.get_total_flops(), "vision": vision}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("image_size", [(56, 84), (150, 60)])
def test_analytic_flops_equal_flop_counter(version, image_size):
    target = tiny_target(version)
    torch.manual_seed(0)
    model = EveForCausalLM(target.config).eval()
    prompt = 7
    prof = profile(target, image_size, prompt_tokens=prompt, convention=STANDARD)
    (w_px, h_px), _, n_visual = visual_geometry(target, *image_size)
    ids = torch.tensor([[3, 4, IMAGE_TOKEN_INDEX, 5, 6, 7, 8, 9]])
    counted = _counted(model, ids, images=[torch.randn(3, h_px, w_px)])
    assert prof.visual_tokens == n_visual
    assert prof.vision_flops == counted["vision"]
    assert prof.llm_flops == counted["total"] - counted["vision"]


def test_analytic_flops_equal_flop_counter_for_gqa_and_tied_head():
    target = tiny_target("v2", num_key_value_heads=1, tie_word_embeddings=True, num_hidden_layers=3)
    model = EveForCausalLM(target.config).eval()
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6]])
    prof = profile(target, (96, 64), prompt_tokens=2)
    assert prof.grid == (3, 4)  # v2 inference geometry: area ~ max_size^2, sides rounded up to 32
    counted = _counted(model, ids, images=[torch.randn(3, 96, 128)])
    assert prof.vision_flops + prof.llm_flops == counted["total"]


def test_an_encoder_based_models_vision_flops_equal_flop_counter(tmp_path):
    """`vision: encoder` (EfficientNet-Lite0 + MLP projector): the vision column counts that encoder
    on the processor's pixels, not an EVE patch embedding; the LLM column is unchanged."""
    from eve_vlm.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "enc", "v2", seed=0, flavour="training", vision="encoder",
                                  modality_experts=False)
    target = load_target(str(folder))
    assert target.config.vision == "encoder"
    model = EveForCausalLM.from_pretrained(folder).eval()
    prof = profile(target, (64, 96), prompt_tokens=3)
    (w_px, h_px), _, _ = visual_geometry(target, 64, 96)
    counted = _counted(model, torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6, 7]]), images=[torch.randn(3, h_px, w_px)])
    assert set(prof.breakdown["vision_flops"]) == {"encoder", "projector"}
    assert prof.vision_flops == counted["vision"]
    assert prof.llm_flops == counted["total"] - counted["vision"]
    assert prof.breakdown["vision_flops"]["encoder"] > 10 * prof.breakdown["vision_flops"]["projector"]


def test_clip_flops_equal_flop_counter_on_a_tiny_hf_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    spec = ClipVisionSpec(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=56, patch_size=14
    )
    hf = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    )
    model = CLIPVisionModel(hf).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(pixel_values=torch.randn(1, 3, 56, 56))
    macs = clip_vision_macs(spec, llm_hidden=64)
    assert 2 * (macs["patch_embedding"] + macs["encoder_layers"]) == fc.get_total_flops()
    assert clip_vision_params(spec, 64)["encoder"] == sum(p.numel() for p in model.parameters())


def test_clip_l_336_parameters_equal_hf_on_meta():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    with torch.device("meta"):
        model = CLIPVisionModel(hf)
    assert clip_vision_params(ClipVisionSpec(), 4096)["encoder"] == sum(p.numel() for p in model.parameters())


def test_routing_costs_one_branch_blend_costs_two():
    cfg = tiny_config("v2")
    routed = decoder_macs(cfg, 50, 50)
    blend = decoder_macs(cfg, 50, 50, blend=True)
    assert blend["attn_proj"] == 2 * routed["attn_proj"] and blend["mlp"] == 2 * routed["mlp"]
    assert blend["attn_scores"] == routed["attn_scores"] and blend["lm_head"] == routed["lm_head"]
    prof = profile(tiny_target("v2"), (96, 64))
    assert prof.official_blend_llm_flops > prof.llm_flops


def test_convention_switches_change_the_count():
    cfg = tiny_config("v1")
    dense, causal, none = (decoder_macs(cfg, 10, 10, a)["attn_scores"] for a in ("dense", "causal", "none"))
    assert (dense, causal, none) == (
        2 * 2 * 4 * 16 * 100,
        2 * 2 * 4 * 16 * 55,
        0,
    )  # layers * (QK, AV) * H * hd * pairs
    target = tiny_target("v1")
    std = profile(target, (112, 112))
    last = profile(target, (112, 112), convention=Convention(lm_head="last"))
    assert std.llm_flops - last.llm_flops == 2 * (std.visual_tokens - 1) * 64 * 300
    paper = profile(target, (112, 112), convention=PAPER)
    assert paper.vision_flops == std.vision_flops


# ------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("tied", [False, True])
def test_meta_parameter_counts_equal_a_real_model(version, tied):
    cfg = tiny_config(version, tie_word_embeddings=tied)
    real = EveForCausalLM(cfg)
    counts = parameter_counts(cfg)
    assert counts == split_parameters(real)
    assert counts["vision"] + counts["llm"] == real.num_parameters()
    assert all(p.is_meta for p in meta_model(cfg).parameters())
    vision_real = sum(
        p.numel()
        for n, p in real.named_parameters()
        if n.startswith(("model.vision_tower.", "model.mm_projector."))
    )
    assert counts["vision"] == vision_real


# ------------------------------------------------------------------------------- geometry, paths


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_visual_tokens_follow_the_processor(version):
    target = tiny_target(version)
    processor = EveImageProcessor(target.image_config)
    for size in [(40, 90), (200, 120), (96, 96)]:
        pixels = processor(Image.new("RGB", size))[0]
        prof = profile(target, size)
        assert prof.visual_tokens == processor.num_image_tokens(pixels)
        assert prof.pixel_size == (pixels.shape[2], pixels.shape[1])


def test_checkpoint_folder_and_config_file(tmp_path):
    cfg = tiny_config("v2")
    cfg.save(tmp_path)
    EveImageProcessor(tiny_image_config("v2")).save_pretrained(tmp_path)
    from_folder = profile(load_target(str(tmp_path)), (96, 96))
    from_file = profile(load_target(str(tmp_path / "config.json")), (96, 96))
    assert (
        from_folder.vision_flops
        == from_file.vision_flops
        == profile(tiny_target("v2"), (96, 96)).vision_flops
    )
    assert from_folder.llm_params == parameter_counts(cfg)["llm"]


def test_unknown_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown config"):
        load_target("no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_target(str(tmp_path))


# ------------------------------------------------------------------------------- latency


def test_latency_report_runs_small_models_and_skips_large_ones():
    """The report's deterministic fields; the timings themselves are measured in bench/, not asserted."""
    lat = measure_latency(tiny_target("v2"), (64, 64), prompt_tokens=4, repeats=1, device="cpu")
    assert set(lat) == {"device", "dtype", "threads", "vision_ms", "prefill_ms", "llm_ms", "prefill_tokens", "repeats"}
    assert (lat["device"], lat["dtype"], lat["threads"], lat["repeats"]) == ("cpu", "float32", 1, 1)
    # 64x64 at max_size 96 -> 96x96 px, a 3x3 grid: 1 + 3 * (3 + 1) visual tokens, plus the prompt
    assert lat["prefill_tokens"] == profile(tiny_target("v2"), (64, 64)).visual_tokens + 4 == 1 + 3 * 4 + 4
    assert lat["llm_ms"] == pytest.approx(max(lat["prefill_ms"] - lat["vision_ms"], 0.0), abs=1e-9)
    assert "exceed the latency limit of 1.50 B" in measure_latency(builtin_targets()["eve-7b-v1"])["skipped"]
    assert "needs an EVE model" in measure_latency(builtin_targets()["llava-1.5-7b"])["skipped"]


# ------------------------------------------------------------------------------- the CLI


def test_cli_json_has_the_required_keys(capsys):
    assert cli_main(["profile", "--config", "eve-7b-v1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("vision_flops", "llm_flops", "vision_params", "llm_params", "visual_tokens"):
        assert isinstance(data[key], int) and data[key] > 0, key
    assert data["visual_tokens"] == 601
    assert {r["row"] for r in data["paper_table"]} == {"LLaVA-1.5", "EVE-7B", "EVE-7B-HD"}


def test_cli_text_report_shows_paper_rows_and_options(capsys):
    args = [
        "profile",
        "--config",
        "eve-7b-hd-v2",
        "--image-size",
        "640x480",
        "--prompt-tokens",
        "64",
        "--latency",
    ]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    # v2 inference scales 640x480 up to an area of about 1600^2, sides rounded up to multiples of 32:
    # 1856x1408 px, a 44x58 grid, 1 + 44 * (58 + 1) = 2597 visual tokens
    assert "2597 visual tokens" in out
    assert "latency: skipped" in out
    assert "EVE-7B-HD" in out and "60.80 T" in out


def test_cli_bad_input(capsys):
    assert cli_main(["profile", "--config", "nope"]) == 2
    assert "unknown config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["profile", "--config", "eve-7b-v1", "--image-size", "big"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_report_is_plain_text():
    from eve_vlm.eval.profile_cli import print_report

    data = profile(tiny_target("v1"), (112, 112)).to_dict()
    buf = io.StringIO()
    print_report(data, buf)
    assert "vision" in buf.getvalue() and "LLM" in buf.getvalue()
