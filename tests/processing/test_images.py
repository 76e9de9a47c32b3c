"""Image loading and EVE v1/v2 pixel preprocessing (bit-exact against the official fixtures)."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eve_vlm.processing import (
    CLIP_MEAN,
    CLIP_STD,
    EveImageConfig,
    EveImageProcessor,
    ImageError,
    load_image,
    num_image_tokens,
    num_image_tokens_for_size,
    preset_for,
    resolve_image_config,
    v1_official_layout,
    v1_pixels,
    v1_teacher_layout,
    v2_output_size,
    v2_pixels,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_ROOT = Path(
    os.environ.get("EVE_OFFICIAL_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "official")
)


def _fixture_images() -> list[tuple[Path, str]]:
    """(set folder, image name) for every image listed in every fixture set's cases.json."""
    if not FIXTURE_ROOT.is_dir():
        return []
    out = []
    for set_dir in sorted(p for p in FIXTURE_ROOT.iterdir() if (p / "cases.json").is_file()):
        cases = json.loads((set_dir / "cases.json").read_text())
        out.extend((set_dir, name) for name in sorted(cases["images"]))
    return out


FIXTURE_IMAGES = _fixture_images()


def _gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """Deterministic RGB test image with structure in both directions."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x ^ y) & 255], -1)
    arr = (arr + rng.integers(0, 20, arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _band_of(layout: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.where(layout[3] > 0)
    return layout[:3, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


# ------------------------------------------------------------------------------ official fixtures


@pytest.mark.skipif(not FIXTURE_IMAGES, reason=f"no official fixtures under {FIXTURE_ROOT}")
@pytest.mark.parametrize("set_dir,name", FIXTURE_IMAGES, ids=[f"{d.name}-{n}" for d, n in FIXTURE_IMAGES])
def test_pixels_match_official_fixture(set_dir: Path, name: str) -> None:
    from safetensors.torch import load_file

    cases = json.loads((set_dir / "cases.json").read_text())
    tensors = load_file(str(set_dir / "cases.safetensors"))
    cfg = EveImageConfig.from_dict(cases["preprocessor"])
    info = cases["images"][name]
    img = load_image(set_dir / info["file"])
    assert list(img.size) == info["size_wh"]
    ref = tensors[f"pixel_values.{name}"]
    counts = {c["images"][0]: c["image_token_counts"][0] for c in cases["cases"] if len(c["images"]) == 1}

    if cfg.version == "v1":
        layout = v1_official_layout(img, cfg)
        assert layout.shape == ref.shape
        assert torch.equal(layout, ref), (layout - ref).abs().max()
        band = v1_pixels(img, cfg)
        assert torch.equal(band, _band_of(ref))
        if name in counts:
            assert num_image_tokens(band, cfg) == counts[name]
        clip_key = f"pixel_values_clip.{name}"
        if clip_key in tensors:
            teacher_cfg = json.loads((set_dir / "clip_teacher" / "preprocessor_config.json").read_text())
            pixels, patch_mask = v1_teacher_layout(
                img,
                cfg,
                size=cfg.image_size_clip,
                patch=cfg.patch_stride_clip,
                mean=teacher_cfg["image_mean"],
                std=teacher_cfg["image_std"],
            )
            ref_clip = tensors[clip_key]
            assert torch.equal(pixels, ref_clip[:3])
            expected_mask = torch.nn.functional.avg_pool2d(ref_clip[3:4], cfg.patch_stride_clip)[0] == 1
            assert torch.equal(patch_mask, expected_mask)
    else:
        pixels = v2_pixels(img, cfg)
        assert pixels.shape == ref.shape
        assert torch.equal(pixels, ref), (pixels - ref).abs().max()
        if name in counts:
            assert num_image_tokens(pixels, cfg) == counts[name]
        train_shape = info.get("train_pipeline_pixel_values_shape")
        if train_shape:
            assert list(v2_pixels(img, cfg, training=True).shape) == train_shape


# ------------------------------------------------------------------------------ v1 worked examples


@pytest.mark.parametrize(
    "size,tokens672,tokens1344,band672",
    [
        ((640, 480), 451, 1765, (672, 504)),
        ((480, 640), 457, 1777, (504, 672)),
        ((500, 500), 601, 2353, (672, 672)),
        ((1920, 400), 126, 491, (672, 140)),
    ],
)
def test_v1_worked_examples(size, tokens672, tokens1344, band672) -> None:
    img = _gradient(*size)
    for preset, tokens in (
        ("eve-patch14-anypixel-672", tokens672),
        ("eve-patch14-anypixel-1344", tokens1344),
    ):
        cfg = preset_for(preset)
        band = v1_pixels(img, cfg)
        assert num_image_tokens(band, cfg) == tokens
        assert num_image_tokens_for_size(*size, cfg) == tokens
        if preset.endswith("672"):
            assert (band.shape[2], band.shape[1]) == band672


def test_v1_padding_layout_640x480_and_1920x400() -> None:
    cfg = preset_for("eve-patch14-anypixel-672")
    layout = v1_official_layout(_gradient(640, 480), cfg)
    rows = layout[3].amax(dim=1)
    assert layout.shape == (4, 672, 672)
    assert rows[:84].sum() == 0 and rows[84:588].all() and rows[588:].sum() == 0  # pad 84 / 84
    layout = v1_official_layout(_gradient(1920, 400), cfg)
    rows = layout[3].amax(dim=1)
    assert rows[:252].sum() == 0 and rows[252:392].all() and rows[392:].sum() == 0  # pad 252 / 280
    # padding is the mean colour int(mean*255), normalised
    fill = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    assert torch.allclose(layout[:3, 0, 0], fill, atol=1e-6)


@pytest.mark.parametrize("size", [(37, 200), (200, 37), (333, 334), (81, 80), (1, 1), (3000, 7)])
def test_v1_pixels_equals_cropped_official_layout(size) -> None:
    cfg = EveImageConfig(
        version="v1", image_size=112, image_size_clip=56, patch_stride=14, patch_stride_clip=14, conv_stride=2
    )
    img = _gradient(*size, seed=3)
    layout = v1_official_layout(img, cfg)
    band = v1_pixels(img, cfg)
    assert torch.equal(band, _band_of(layout))
    assert band.shape[1] % cfg.token_stride == 0 and band.shape[2] % cfg.token_stride == 0


def test_teacher_layout_generalises_to_other_teachers() -> None:
    # EfficientNet-style teacher: 224 px, stride 16, mean = std = 0.5
    img = _gradient(640, 480)
    pixels, mask = v1_teacher_layout(img, size=224, patch=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert pixels.shape == (3, 224, 224) and mask.shape == (14, 14) and mask.dtype == torch.bool
    # short side 224*480/640 = 168 -> ceil to 11 patches = 176 px, centred: pre = ((14-11)//2)*16 = 16
    assert mask.all(dim=1).tolist() == [False] + [True] * 11 + [False] * 2
    assert mask.any(dim=1).tolist() == mask.all(dim=1).tolist()  # full-width band
    assert torch.allclose(pixels[:, 0, 0], torch.full((3,), (127 / 255 - 0.5) / 0.5), atol=1e-6)
    tall_pixels, tall_mask = v1_teacher_layout(
        _gradient(300, 900), size=224, patch=16, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    # 300x900: width 224*300/900 = 74.7 -> 5 patches, pre = ((14-5)//2)*16 = 64 px -> columns 4..8
    assert tall_mask.all(dim=0).tolist() == [False] * 4 + [True] * 5 + [False] * 5
    assert tall_mask.any(dim=0).tolist() == tall_mask.all(dim=0).tolist()
    assert tall_pixels.shape == (3, 224, 224)
    # the default geometry is the CLIP one from a v1 config
    cfg = preset_for("eve-patch14-anypixel-672")
    pixels, mask = v1_teacher_layout(img, cfg)
    assert pixels.shape == (3, 336, 336) and mask.shape == (24, 24) and int(mask.sum()) == 18 * 24


# ------------------------------------------------------------------------------ v2


def test_v2_worked_examples() -> None:
    hd = preset_for("eve-anyratio-res1600-patch16")
    lo = preset_for("eve-anyratio-res800-patch16")
    assert v2_output_size(640, 480, hd) == (1856, 1408)
    assert num_image_tokens_for_size(640, 480, hd) == 2597
    assert v2_output_size(640, 480, hd, training=True) == (640, 480)
    assert num_image_tokens_for_size(640, 480, hd, training=True) == 316
    assert num_image_tokens_for_size(1000, 1000, hd) == 2551
    assert num_image_tokens_for_size(1000, 1000, hd, training=True) == 993
    assert (
        num_image_tokens_for_size(1000, 1000, lo)
        == num_image_tokens_for_size(1000, 1000, lo, training=True)
        == 651
    )
    pixels = v2_pixels(_gradient(1000, 1000), lo)
    assert pixels.shape == (3, 800, 800) and pixels.dtype == torch.float32
    assert num_image_tokens(pixels, lo) == 651
    # resize_mode selects the rule when training is not given
    train_cfg = hd.replace(resize_mode="train")
    assert v2_pixels(_gradient(640, 480), train_cfg).shape == (3, 480, 640)
    # tiny and extreme images still give at least one stride per side
    assert v2_output_size(1, 1, lo, training=True) == (32, 32)
    w, h = v2_output_size(5000, 3, lo)
    assert h == 32 and w % 32 == 0


# ------------------------------------------------------------------------------ loading


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_sources(tmp_path: Path) -> None:
    img = _gradient(20, 10)
    data = _png_bytes(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (path, str(path), data, bytearray(data), url, img):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (20, 10)
        assert np.array_equal(np.asarray(out), np.asarray(img))


def test_load_image_converts_modes_to_rgb() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    out = load_image(_png_bytes(rgba))
    assert (
        out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    )
    assert load_image(Image.new("L", (3, 3), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(Image.new("CMYK", (3, 3))).mode == "RGB"
    pal = Image.new("RGB", (3, 3), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert load_image(_png_bytes(pal)).getpixel((1, 1)) == (10, 20, 30)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries only a few bytes of pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"definitely not an image")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    truncated = _png_bytes(_gradient(64, 64))[:200]
    with pytest.raises(ImageError, match="corrupt|truncated|readable"):
        load_image(truncated)
    with pytest.raises(ImageError, match="zero width"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(_png_bytes(_gradient(100, 100)), max_pixels=5000)
    # decided from the header: a 10000x10000 PNG header with no pixel data is rejected as too large
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(_png_header_only(10000, 10000))
    with pytest.raises(ImageError, match="data URL"):
        load_image("data:image/png,notbase64")
    with pytest.raises(ImageError, match="unsupported"):
        load_image(12345)


# ------------------------------------------------------------------------------ config / presets


def test_config_from_official_dict_and_round_trip() -> None:
    official = {
        "do_center_crop": False,
        "do_normalize": True,
        "do_resize": False,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
        "max_size": 800,
        "patch_stride": 16,
        "dense_stride": 2,
    }
    cfg = EveImageConfig.from_dict(official)
    assert cfg.version == "v2" and cfg.max_size == 800 and cfg.token_stride == 32
    assert cfg == preset_for("eve-anyratio-res800-patch16").replace(extra=cfg.extra)
    again = EveImageConfig.from_dict(cfg.to_dict())
    assert again == cfg
    for key, value in official.items():
        assert cfg.to_dict()[key] == value
    v1 = preset_for("/some/where/openai/eve-patch14-anypixel-1344/")
    assert v1.version == "v1" and v1.image_size == 1344 and v1.token_stride == 28 and v1.ratio == 4
    assert EveImageConfig.from_dict(v1.to_dict()) == v1
    assert preset_for("openai/eve-unknown") is None
    with pytest.raises(ValueError, match="not an EVE preprocessor config"):
        EveImageConfig.from_dict({"do_resize": True, "size": 224})
    with pytest.raises(ValueError, match="missing"):
        EveImageConfig(version="v1", image_size=672)


def test_resolve_image_config_order(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # (3) built-in preset by name
    cfg = resolve_image_config(ckpt, {"mm_vision_tower": "openai/eve-anyratio-res1600-patch16"})
    assert cfg.max_size == 1600
    # (2) a folder named by mm_vision_tower, relative to the checkpoint, wins over the preset
    tower = ckpt / "openai" / "eve-anyratio-res1600-patch16"
    EveImageProcessor(preset_for("eve-anyratio-res800-patch16")).save_pretrained(tower)
    assert (
        resolve_image_config(ckpt, {"mm_vision_tower": "openai/eve-anyratio-res1600-patch16"}).max_size == 800
    )
    # ... also absolute, and read from config.json when no dict is given
    (ckpt / "config.json").write_text(json.dumps({"mm_vision_tower": str(tower)}))
    assert resolve_image_config(ckpt).max_size == 800
    # (1) the checkpoint's own preprocessor_config.json wins over everything
    EveImageProcessor(preset_for("eve-patch14-anypixel-672")).save_pretrained(ckpt)
    assert resolve_image_config(ckpt).version == "v1"
    # nothing found: the error names what was looked for
    with pytest.raises(FileNotFoundError, match="eve-nowhere.*Known presets"):
        resolve_image_config(tmp_path / "empty", {"mm_vision_tower": "openai/eve-nowhere"})


def test_image_processor_call_and_save_load(tmp_path: Path) -> None:
    cfg = EveImageConfig(
        version="v1", image_size=112, image_size_clip=56, patch_stride=14, patch_stride_clip=14, conv_stride=2
    )
    proc = EveImageProcessor(cfg)
    imgs = [_gradient(120, 50), _gradient(60, 100)]
    out = proc(imgs)
    assert [tuple(t.shape) for t in out] == [(3, 56, 112), (3, 112, 84)]
    layout = proc.official_layout(imgs)
    assert layout.shape == (2, 4, 112, 112)
    assert torch.equal(out[0], _band_of(layout[0]))
    proc.save_pretrained(tmp_path)
    again = EveImageProcessor.from_pretrained(tmp_path)
    assert again.config == cfg
    v2 = EveImageProcessor(preset_for("eve-anyratio-res800-patch16"))
    with pytest.raises(ValueError, match="v1 only"):
        v2.official_layout(imgs)
