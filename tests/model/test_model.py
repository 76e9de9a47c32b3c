"""Unit tests of the model core on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from eve_vlm import EveConfig, EveForCausalLM
from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.conversion import convert_llm
from eve_vlm.generate import generate
from eve_vlm.model import CheckpointError, ConfigError
from eve_vlm.model.decoder import TokenRoute

IMG = IMAGE_TOKEN_INDEX


def tiny_config(version: str = "v2", **kw) -> EveConfig:
    base = dict(
        version=version,
        family="qwen2" if version == "v2" else "llama",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=16,
        patch_stride=16 if version == "v2" else 14,
        merge_stride=2,
        modality_experts=version == "v2",
        attention_bias=version == "v2",
        eos_token_id=96,
    )
    base.update(kw)
    return EveConfig(**base)


def tiny_model(version: str = "v2", seed: int = 0, **kw) -> EveForCausalLM:
    torch.manual_seed(seed)
    model = EveForCausalLM(tiny_config(version, **kw)).eval()
    if version == "v2":  # make vision copies differ from text weights
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "moe_" in name:
                    p.add_(0.3 * torch.randn_like(p))
    return model


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_visual_token_count_and_layout(version):
    model = tiny_model(version)
    stride = model.config.token_stride
    vis = model.model.encode_images([image(2 * stride, 3 * stride), image(stride, stride, 1)])
    assert vis.grids == [(2, 3), (1, 1)]
    assert vis.lengths == [1 + 2 * 4, 1 + 1 * 2]
    assert vis.tokens.shape == (sum(vis.lengths), model.config.hidden_size)
    if version == "v2":  # split tokens sit after every row
        split = model.model.vision_tower.split_embedding
        for idx in (4, 8):
            assert torch.equal(vis.tokens[idx], split)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_images_of_different_sizes_encode_as_alone(version):
    model = tiny_model(version)
    s = model.config.token_stride
    a, b = image(2 * s, 3 * s), image(3 * s, s, 1)
    together = model.model.encode_images([a, b, a]).tokens
    alone = torch.cat([model.model.encode_images([x]).tokens for x in (a, b, a)])
    torch.testing.assert_close(together, alone)


def test_splice_positions_labels_and_masks():
    model = tiny_model("v2")
    s = model.config.token_stride
    ids = torch.tensor([[5, IMG, 6, 7, IMG, 8], [9, 10, 11, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    labels = ids.clone().masked_fill(ids < 0, IGNORE_INDEX)
    vision = model.model.encode_images([image(s, s), image(s, 2 * s)])  # 3 and 4 tokens
    sp = model.splice(ids, vision, mask, labels)
    assert sp.embeds.shape[:2] == (2, 4 + 3 + 4)
    assert sp.visual_mask[0].tolist() == [0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]
    assert sp.visual_mask[1].sum() == 0
    assert sp.valid[1].tolist() == [1, 1, 1] + [0] * 8
    assert sp.labels[0][sp.visual_mask[0]].eq(IGNORE_INDEX).all()
    assert sp.labels[0][~sp.visual_mask[0]].tolist() == [5, 6, 7, 8]
    assert sp.positions[0].tolist() == list(range(11))
    torch.testing.assert_close(sp.embeds[0, 1:4], vision.tokens[:3])
    # The caller's ids are untouched (the official v2 code writes 0 into them).
    assert ids[0, 1] == IMG


def test_placeholder_image_mismatch_is_an_error():
    model = tiny_model("v2")
    s = model.config.token_stride
    with pytest.raises(ValueError, match="placeholders"):
        model(torch.tensor([[1, IMG, 2]]), images=[image(s, s), image(s, s)])
    with pytest.raises(ValueError, match="placeholders"):
        model(torch.tensor([[1, IMG, 2]]))
    with pytest.raises(ValueError, match="multiples"):
        model(torch.tensor([[1, IMG, 2]]), images=[image(s + 1, s)])


def test_routing_uses_vision_weights_only_on_visual_tokens():
    model = tiny_model("v2")
    s = model.config.token_stride
    ids = torch.tensor([[3, 4, 5, IMG, 6, 7]])
    images = [image(s, 2 * s)]
    base = model(ids, images=images).logits
    changed = tiny_model("v2")
    with torch.no_grad():
        for name, p in changed.named_parameters():
            if "moe_" in name:
                p.add_(torch.randn_like(p))
    out = changed(ids, images=images).logits
    # Text before the first image never touches a vision weight.
    torch.testing.assert_close(out[0, :3], base[0, :3])
    assert not torch.allclose(out[0, 3:], base[0, 3:], atol=1e-4)
    # Text-only input: vision copies are irrelevant.
    torch.testing.assert_close(changed(ids[:, :3]).logits, model(ids[:, :3]).logits)


def test_routing_equals_blend_of_both_branches():
    """Routing by index must equal the official compute-both-then-blend result (exact select)."""
    model = tiny_model("v2")
    x = torch.randn(2, 7, model.config.hidden_size)
    mask = torch.rand(2, 7) > 0.5
    route = TokenRoute.from_mask(mask)
    layer = model.model.layers[0]
    routed = route.apply(x, lambda h: layer.mlp(h), lambda h: layer.moe_mlp(h))
    m = mask[..., None].float()
    blended = layer.mlp(x) * (1 - m) + layer.moe_mlp(x) * m
    torch.testing.assert_close(routed, blended)
    assert TokenRoute.from_mask(torch.zeros(2, 7, dtype=torch.bool)) is None


def test_each_token_goes_through_one_branch_only():
    """Routing, not blending: the vision MLP sees only visual tokens, the text MLP only text tokens."""
    model = tiny_model("v2")
    s = model.config.token_stride
    seen = {}
    layer = model.model.layers[1]
    layer.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("text", i[0].shape[0]))
    layer.moe_mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("vision", i[0].shape[0]))
    model(torch.tensor([[3, 4, IMG, 5]]), images=[image(s, 2 * s)])  # 1 + 1*3 = 4 visual tokens
    assert seen == {"text": 3, "vision": 4}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_kv_cached_generation_equals_full_recompute(version):
    model = tiny_model(version)
    s = model.config.token_stride
    ids = torch.tensor([[3, IMG, 4, 5, 6]])
    images = [image(2 * s, s)]
    got = generate(model, ids, images, max_new_tokens=6, eos_token_id=[-1]).sequences[0]
    seq = ids
    for _ in range(6):
        nxt = model(seq, images=images).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert got == seq[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_batched_generation_equals_single(version):
    model = tiny_model(version)
    s = model.config.token_stride
    rows = [
        (torch.tensor([[3, IMG, 4, 5]]), [image(2 * s, s)]),
        (torch.tensor([[7, 8, 9, 10, 11, 12, IMG, 13]]), [image(s, 3 * s, 2)]),
        (torch.tensor([[14, 15]]), []),
    ]
    singles = [generate(model, i, im or None, max_new_tokens=5, eos_token_id=[-1]).sequences[0] for i, im in rows]
    width = max(i.shape[1] for i, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (i, _) in enumerate(rows):  # left padding
        ids[r, width - i.shape[1] :] = i[0]
        mask[r, width - i.shape[1] :] = 1
    images = [im for _, ims in rows for im in ims]
    batched = generate(model, ids, images, mask, max_new_tokens=5, eos_token_id=[-1]).sequences
    assert batched == singles


def test_packing_gives_same_loss_as_separate_rows():
    model = tiny_model("v2")
    s = model.config.token_stride
    a = torch.tensor([3, IMG, 4, 5, 6])
    b = torch.tensor([7, 8, 9, 10])
    la, lb = a.clone().masked_fill(a < 0, IGNORE_INDEX), b.clone()
    la[0] = IGNORE_INDEX
    imgs = [image(s, 2 * s)]
    sep_a = model(a[None], images=imgs, labels=la[None])
    sep_b = model(b[None], labels=lb[None])
    packed = model(
        torch.cat([a, b])[None],
        images=imgs,
        labels=torch.cat([la, lb])[None],
        segment_ids=torch.tensor([[1] * 5 + [2] * 4]),
    )
    total = sep_a.lm_loss_sum + sep_b.lm_loss_sum
    assert packed.num_label_tokens == sep_a.num_label_tokens + sep_b.num_label_tokens
    torch.testing.assert_close(packed.lm_loss_sum, total, rtol=1e-5, atol=1e-5)
    # logits of the second sample do not depend on the first one
    torch.testing.assert_close(packed.logits[0, -4:], sep_b.logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_shared_prefix_branches_equal_separate_samples(version):
    """One row "prefix + branch 1 + branch 2" gives each branch the logits, loss and gradients
    it has as its own sample "prefix + branch"; branches never see each other."""
    model = tiny_model(version).train()
    s = model.config.token_stride
    prefix = torch.tensor([3, IMG, 4])
    b1, b2 = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11])
    lab = lambda t: torch.cat([torch.tensor([IGNORE_INDEX]), t[1:]])  # noqa: E731  first branch token: never a target
    ignore = torch.full_like(prefix, IGNORE_INDEX)
    imgs = [image(s, 2 * s)]
    n_vis = model.model.encode_images(imgs).lengths[0]
    sep = [model(torch.cat([prefix, b])[None], images=imgs, labels=torch.cat([ignore, lab(b)])[None]) for b in (b1, b2)]
    row = torch.cat([prefix, b1, b2])[None]
    branches = torch.tensor([[0] * 3 + [1] * 3 + [2] * 4])
    joint = model(row, images=imgs, labels=torch.cat([ignore, lab(b1), lab(b2)])[None], branch_ids=branches)
    assert joint.num_label_tokens == sep[0].num_label_tokens + sep[1].num_label_tokens
    torch.testing.assert_close(joint.lm_loss_sum, sep[0].lm_loss_sum + sep[1].lm_loss_sum, rtol=1e-5, atol=1e-5)
    p_len = 2 + n_vis  # spliced prefix
    torch.testing.assert_close(joint.logits[0, : p_len + 3], sep[0].logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(joint.logits[0, p_len + 3 :], sep[1].logits[0, p_len:], rtol=1e-4, atol=1e-5)
    joint.lm_loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (sep[0].lm_loss_sum + sep[1].lm_loss_sum).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5)


def test_branches_inside_packed_segments_and_bad_layouts():
    model = tiny_model("v1").eval()
    s = model.config.token_stride
    a = torch.tensor([3, IMG, 4, 5, 6, 7, 8])
    a_br = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    c = torch.tensor([9, 10, 11])
    imgs = [image(s, s)]
    alone = model(a[None], images=imgs, branch_ids=a_br[None]).logits
    other = model(c[None]).logits
    packed = model(torch.cat([c, a])[None], images=imgs, segment_ids=torch.tensor([[1] * 3 + [2] * 7]),
                   branch_ids=torch.cat([torch.zeros(3, dtype=torch.long), a_br])[None]).logits
    torch.testing.assert_close(packed[0, :3], other[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[0, 3:], alone[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must come before"):
        model(a[None], images=imgs, branch_ids=torch.tensor([[0, 0, 1, 0, 2, 2, 2]]))
    with pytest.raises(ValueError, match="KV cache"):
        model(a[None], images=imgs, branch_ids=a_br[None], use_cache=True)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_layer_on_target_positions_only_gives_the_same_loss_and_gradients(version, checkpointing):
    """Training without logits runs the last layer only where there is a target; the loss and
    every gradient equal the full computation (padding, branches, and a target read off the last
    visual token, which v2 routes through its vision weights)."""
    model = tiny_model(version).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    s = model.config.token_stride
    ids = torch.tensor([[3, IMG, 4, 5, 6, 7, 8], [9, IMG, 10, 11, 0, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 5, IGNORE_INDEX, 7, 8],
                           [IGNORE_INDEX, IGNORE_INDEX, 10, 11, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    branches = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0] * 7])
    imgs = [image(s, 2 * s), image(2 * s, s, 1)]

    def run(return_logits: bool):
        model.zero_grad()
        out = model(ids, images=imgs, attention_mask=mask, labels=labels, branch_ids=branches,
                    return_logits=return_logits)
        out.lm_loss_sum.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(True)
    part, part_grads = run(False)
    assert part.logits is None and part.num_label_tokens == full.num_label_tokens == 3  # 8; 10 (after the image), 11
    torch.testing.assert_close(part.lm_loss_sum, full.lm_loss_sum, rtol=1e-5, atol=1e-5)
    assert full_grads.keys() == part_grads.keys()
    for n, g in full_grads.items():
        torch.testing.assert_close(part_grads[n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_a_prefill_runs_the_last_layer_on_the_kept_positions_only():
    model = tiny_model("v2")
    s = model.config.token_stride
    ids = torch.tensor([[0, 0, 3, IMG, 4, 5], [7, 8, 9, IMG, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    imgs = [image(s, s), image(s, 2 * s, 1)]
    full = model(ids, images=imgs, attention_mask=mask, padding_side="left").logits
    seen = {}
    model.model.layers[-1].mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", i[0].shape[1]))
    last = model(ids, images=imgs, attention_mask=mask, padding_side="left", logits_to_keep=2, use_cache=True)
    assert seen["tokens"] == 4  # two positions in each of two rows
    torch.testing.assert_close(last.logits, full[:, -2:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="collected in full"):
        model.model.run_layers(torch.zeros(1, 2, 32), torch.arange(2)[None], torch.ones(1, 2, dtype=torch.bool),
                               collect=frozenset({4}), keep=torch.ones(1, 2, dtype=torch.bool))


def test_gradient_checkpointing_same_gradients():
    model = tiny_model("v2").train()
    s = model.config.token_stride
    ids = torch.tensor([[3, IMG, 4, 5, 6]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6]])
    model(ids, images=[image(s, s)], labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, images=[image(s, s)], labels=labels).loss.backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_save_load_round_trip(tmp_path, version):
    model = tiny_model(version)
    model.save_pretrained(tmp_path / "m")
    again = EveForCausalLM.from_pretrained(tmp_path / "m")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert again.config == model.config
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_model("v1", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "m")
    again = EveForCausalLM.from_pretrained(tmp_path / "m")
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_aligning_layer_is_kept_for_training_and_dropped_on_request(tmp_path):
    """A v1 checkpoint saved with its aligning layer gives the layer back only to a trainer
    (`keep_training_weights`); `include_aligning_layer=False` leaves it out of the file; other
    files of the folder (processor, tokenizer) survive a save."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    model = tiny_model("v1")
    teacher = SimpleNamespace(hidden_size=8)
    model.attach_aligning_layer(teacher)
    layer = {f"model.vision_tower_compressor.{k}": v for k, v in model.model.vision_tower_compressor.state_dict().items()}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "preprocessor_config.json").write_text("{}")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "preprocessor_config.json").read_text() == "{}"

    plain = EveForCausalLM.from_pretrained(tmp_path / "m")
    assert plain.pending_aligning_weights is None and plain.model.vision_tower_compressor is None
    kept = EveForCausalLM.from_pretrained(tmp_path / "m", keep_training_weights=True).pending_aligning_weights
    assert kept is not None and kept.keys() == layer.keys()
    assert all(torch.equal(kept[k], layer[k]) for k in layer)

    model.save_pretrained(tmp_path / "m", include_aligning_layer=False)
    assert not any(k.startswith("model.vision_tower_compressor.") for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    assert EveForCausalLM.from_pretrained(tmp_path / "m", keep_training_weights=True).pending_aligning_weights is None


def test_load_errors(tmp_path):
    model = tiny_model("v2")
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model_type 'gpt2'"):
        EveForCausalLM.from_pretrained(tmp_path / "m")
    # missing keys: a v2 checkpoint read with a config that says v1
    model.save_pretrained(tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    cfg["modality_experts"] = False
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected keys .*moe_"):
        EveForCausalLM.from_pretrained(tmp_path / "m2")
    with pytest.raises(FileNotFoundError):
        EveForCausalLM.from_pretrained(tmp_path / "nope")


def test_training_only_keys_are_ignored_with_a_log_line(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    model = tiny_model("v1")
    model.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state["model.vision_tower_compressor.input_layer.weight"] = torch.zeros(4, 4)
    state["model.vision_clip.backbone.vision_model.x"] = torch.zeros(2)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with caplog.at_level("INFO"):
        EveForCausalLM.from_pretrained(tmp_path / "m")
    assert sum("training-only" in r.message for r in caplog.records) == 1


def _tiny_hf_llm(folder, family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**kw, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, max_position_embeddings=256))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**kw, rope_theta=1e6, tie_word_embeddings=True))
    hf.save_pretrained(folder)
    return hf.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_convert_llm_keeps_the_llm_exactly(tmp_path, family, version):
    """Text-only logits of the converted model equal the Hugging Face LLM's."""
    hf = _tiny_hf_llm(tmp_path / "llm", family)
    model = convert_llm(tmp_path / "llm", version, vision_hidden_size=16).eval()
    model.save_pretrained(tmp_path / "eve")
    ids = torch.tensor([[1, 5, 9, 22, 40, 3, 7]])
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    again = EveForCausalLM.from_pretrained(tmp_path / "eve")
    torch.testing.assert_close(again(ids).logits, ref, rtol=1e-4, atol=1e-4)
    if version == "v2":  # vision copies start equal to the text weights
        layer = again.model.layers[0]
        assert torch.equal(layer.moe_mlp.up_proj.weight, layer.mlp.up_proj.weight)


def test_convert_llm_keep_layers_equals_hf_model_with_those_layers(tmp_path):
    """keep_layers=[1] gives the logits of the HF model whose decoder is just its layer 1."""
    hf = _tiny_hf_llm(tmp_path / "llm", "llama")
    model = convert_llm(tmp_path / "llm", "v1", vision_hidden_size=16, keep_layers=[1]).eval()
    assert model.config.num_hidden_layers == 1
    hf.model.layers = torch.nn.ModuleList([hf.model.layers[1]])
    hf.model.layers[0].self_attn.layer_idx = 0
    hf.config.num_hidden_layers = 1
    ids = torch.tensor([[1, 5, 9, 22, 40, 3, 7]])
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="keep_layers"):
        convert_llm(tmp_path / "llm", "v1", vision_hidden_size=16, keep_layers=[0, 5])
    with pytest.raises(ValueError, match="keep_layers"):
        convert_llm(tmp_path / "llm", "v1", vision_hidden_size=16, keep_layers=[1, 1])


def test_config_validation():
    with pytest.raises(ConfigError, match="version"):
        EveConfig(version="v3")
    with pytest.raises(ConfigError, match="multiple"):
        EveConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="unknown config fields"):
        EveConfig.from_dict({"model_type": "eve_vlm", "bogus": 1})


def test_v1_patch_activation_applies_gelu_before_the_merge():
    """`patch_activation="gelu"`: tokens = projector(local attention over GELU(conv + bias) windows)."""
    import torch.nn.functional as F

    from eve_vlm.model.vision import window_view

    model = tiny_model("v1", patch_activation="gelu")
    tower = model.model.vision_tower
    with torch.no_grad():
        tower.patch_embedding.bias.normal_()
    px = image(28, 56)  # 2x4 patches -> one row of two merged tokens
    vis = model.model.encode_images([px])
    grid = F.gelu(tower.patch_embedding(px[None])).permute(0, 2, 3, 1)
    members = window_view(grid, 2)
    pooled = members.mean(dim=3)
    row = model.model.mm_projector(tower.local_attention(pooled, members, pooled))[0, 0]  # [2, D]
    torch.testing.assert_close(vis.tokens[1:3], row)  # after CLS, before SPLIT
    assert tiny_model("v1").model.vision_tower.patch_embedding.bias is None  # official: linear, no bias


def test_patch_activation_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match="patch_activation"):
        tiny_config("v1", patch_activation="relu")
    with pytest.raises(ConfigError, match="v1 only"):
        tiny_config("v2", patch_activation="gelu")
    model = tiny_model("v1", patch_activation="gelu")
    model.save_pretrained(tmp_path / "m")
    loaded = EveForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.patch_activation == "gelu"
    px = [image(28, 28)]
    torch.testing.assert_close(loaded.model.encode_images(px).tokens, model.model.encode_images(px).tokens)
