"""docs/finetuning.md, run: its recipe and every shell command, on a tiny random model and a small
generated LLaVA-format dataset laid out as the doc describes, so the doc cannot rot."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from eve_vlm.cli import main as eve_main  # noqa: E402
from eve_vlm.testing import generate_shapes_dataset, make_tiny_checkpoint  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "finetuning.md"


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def doc_commands() -> list[str]:
    """Every command line of the doc's bash blocks, continuation lines joined."""
    lines = []
    for block in doc_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def write_user_data(root: Path, n_train: int = 20, n_eval: int = 4) -> None:
    """my_data/train.json (a LLaVA JSON list), my_data/images/, my_data/eval.jsonl (generic questions)."""
    records = [json.loads(line) for line in generate_shapes_dataset(root / "my_data", n_train + n_eval, "qa").read_text().splitlines()]
    (root / "my_data" / "train.json").write_text(json.dumps(records[:n_train]))
    with (root / "my_data" / "eval.jsonl").open("w") as f:
        for r in records[n_train:]:
            question = r["conversations"][0]["value"].replace("<image>\n", "")
            f.write(json.dumps({"image": r["image"], "text": question, "answer": r["conversations"][1]["value"]}) + "\n")


def test_the_doc_covers_the_whole_path():
    commands = [shlex.split(c)[:2] for c in doc_commands()]
    assert all(c[0] == "eve" for c in commands), commands
    assert {c[1] for c in commands} == {"train", "merge-lora", "ask", "chat", "eval"}
    assert any("lora=null" in c for c in doc_commands())  # the full fine-tune
    assert [b for b in doc_blocks("yaml") if "lora:" in b], "the LoRA recipe"


@pytest.mark.slow
def test_every_command_of_the_doc_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    make_tiny_checkpoint(tmp_path / "checkpoints" / "base", "v2", flavour="training")
    write_user_data(tmp_path)
    (recipe,) = [b for b in doc_blocks("yaml") if "name: my-lora" in b]
    (tmp_path / "my_lora.yaml").write_text(recipe)
    turns = iter(["What color is the shape?", "/quit"])

    def chat_input(prompt: str = "") -> str:
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", chat_input)
    for command in doc_commands():
        argv = shlex.split(command)[1:]
        assert eve_main(argv) == 0, command
        out = capsys.readouterr().out
        if argv[0] in ("ask", "chat"):
            assert out.strip(), f"{command}: no answer"

    adapter = load_file(str(tmp_path / "runs/my-lora/final/adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert (tmp_path / "runs/my-lora-merged/model.safetensors").is_file()
    assert (tmp_path / "runs/my-full/final/model.safetensors").is_file()
    assert json.loads((tmp_path / "runs/my-full/recipe.json").read_text())["lora"] is None
    for name in ("my-lora", "my-full"):
        assert any((tmp_path / "eval_runs" / name).iterdir()), name
