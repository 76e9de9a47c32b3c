"""The `eve` command's manners: one `eve: error:` line and exit code 2 on bad input, found before
any model is loaded; --debug for the traceback; --version; help that shows every default."""

from __future__ import annotations

import argparse
import importlib
import socket
from importlib import metadata
from pathlib import Path

import pytest
import torch

from eve_vlm import cli
from eve_vlm.cli import main


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command writes on stderr (and nothing on stdout)."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith("eve: error: ")
    return lines[0]


@pytest.fixture
def fake_model_dir(tmp_path: Path) -> Path:
    """Looks like a checkpoint folder from outside; loading it would fail (so no test may reach that)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load or build a model fails the test: inputs must be checked before."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("eve_vlm.loading.load_for_inference", forbidden)
    monkeypatch.setattr("eve_vlm.train.builder.build_model_and_processor", forbidden)


def test_version_comes_from_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"eve {metadata.version('eve-vlm')}"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "answer length limit (default: 256)" in out
    assert "(default: auto)" in out
    assert "(default: None)" not in out  # an unset default says nothing


def _parsers(parser: argparse.ArgumentParser, name: str = "eve"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_a_help_text():
    parsers = dict(_parsers(cli.build_parser()))
    assert {"eve ask", "eve chat", "eve serve", "eve eval", "eve train", "eve convert-llm"} <= set(parsers)
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in parsers.items()
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []


@pytest.mark.parametrize(
    "argv",
    [
        ["ask", "--model", "{missing}", "What is this?"],
        ["chat", "--model", "{missing}"],
        ["serve", "--model", "{missing}"],
        ["eval", "--model", "{missing}", "--benchmark", "gqa", "--data", "{tmp}"],
    ],
    ids=["ask", "chat", "serve", "eval"],
)
def test_missing_model_folder_is_one_line(argv, tmp_path, capsys, no_model_loading):
    missing = tmp_path / "no-such-model"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert error_line(capsys) == f"eve: error: model folder not found: {missing}"


def test_folder_without_config_is_not_a_model(tmp_path, capsys, no_model_loading):
    assert main(["ask", "--model", str(tmp_path), "Hi"]) == 2
    assert "no config.json" in error_line(capsys)


def test_missing_image_is_found_before_the_model_loads(fake_model_dir, tmp_path, capsys, no_model_loading):
    image = tmp_path / "missing.png"
    assert main(["ask", "--model", str(fake_model_dir), "--image", str(image), "What is this?"]) == 2
    assert error_line(capsys) == f"eve: error: image file not found: {image}"


def test_corrupt_image_is_one_line(fake_model_dir, tmp_path, capsys, no_model_loading):
    image = tmp_path / "broken.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    assert main(["chat", "--model", str(fake_model_dir), "--image", str(image)]) == 2
    line = error_line(capsys)
    assert "not a readable image" in line and str(image) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["ask", "serve"])
def test_cuda_without_cuda_is_one_line(command, fake_model_dir, capsys, no_model_loading):
    argv = [command, "--model", str(fake_model_dir), "--device", "cuda"] + (["Hi"] if command == "ask" else [])
    assert main(argv) == 2
    line = error_line(capsys)
    assert "'cuda' was requested but CUDA is not available" in line


def test_serve_on_a_busy_port_fails_before_loading(fake_model_dir, capsys, no_model_loading):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(fake_model_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in error_line(capsys)


def test_bad_sampling_flags_fail_before_loading(fake_model_dir, capsys, no_model_loading):
    assert main(["ask", "--model", str(fake_model_dir), "--top-p", "1.5", "Hi"]) == 2
    assert "top_p must be in (0, 1]" in error_line(capsys)


def test_more_placeholders_than_images_fail_before_loading(fake_model_dir, capsys, no_model_loading):
    assert main(["ask", "--model", str(fake_model_dir), "Compare <image> and <image>"]) == 2
    assert "2 <image> placeholder(s) but only 0 image(s)" in error_line(capsys)


def test_convert_llm_missing_folder(tmp_path, capsys):
    llm, out = tmp_path / "no-such-llm", tmp_path / "out"
    assert main(["convert-llm", str(llm), str(out)]) == 2
    line = error_line(capsys)
    assert str(llm) in line and "does not exist" in line
    assert not out.exists()


def test_train_missing_data_path_is_found_before_the_model_is_built(tmp_path, capsys, no_model_loading):
    data = tmp_path / "no-such-data.jsonl"
    argv = ["train", "tiny/eve_v2/1_vision", "--set", f"data.path={data}", "--set", f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "data.path" in line and str(data) in line


def test_train_unknown_recipe_field(tmp_path, capsys, no_model_loading):
    recipe = tmp_path / "my_stage.yaml"
    recipe.write_text("model:\n  tiny: true\noptim:\n  learning_rate: 0.1\n")
    assert main(["train", str(recipe)]) == 2
    line = error_line(capsys)
    assert "unknown recipe keys in optim" in line and "learning_rate" in line


def test_train_recipe_with_a_yaml_syntax_error(tmp_path, capsys, no_model_loading):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  tiny: [true\n")
    assert main(["train", str(recipe)]) == 2
    assert "while parsing" in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_cuda(tmp_path, capsys, no_model_loading):
    argv = ["train", "tiny/eve_v2/1_vision", "--set", "device=cuda", "--set", f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    assert "CUDA is not available" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_train_missing_recipe(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in error_line(capsys)


def test_eval_without_a_model_names_the_missing_flags(tmp_path, capsys):
    assert main(["eval", "--benchmark", "gqa"]) == 2
    assert error_line(capsys) == "eve: error: --model, --data required (or use --rescore DIR)"
    assert main(["eval", "--rescore", str(tmp_path)]) == 2
    assert "not an eval output folder" in error_line(capsys)


def test_data_missing_manifest(tmp_path, capsys):
    manifest = tmp_path / "absent.jsonl"
    argv = ["data", "dedup", "--manifest", str(manifest), "--out", str(tmp_path / "x.jsonl")]
    assert main(argv + ["--clusters", "2", "--per-cluster", "1"]) == 2
    assert error_line(capsys) == f"eve: error: manifest not found: {manifest}"


def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["--debug", "ask", "--model", str(missing), "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "FileNotFoundError" in err
    assert err.strip().splitlines()[-1] == f"eve: error: model folder not found: {missing}"


def test_a_bug_is_not_hidden_as_bad_input(monkeypatch, tmp_path):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("eve_vlm.generate.cli.run_ask", broken)  # registered when main builds the parser
    with pytest.raises(RuntimeError, match="a bug"):
        main(["ask", "--model", str(tmp_path), "Hi"])


def test_a_command_whose_extra_is_missing_says_what_to_install(monkeypatch, capsys):
    real_import = importlib.import_module

    def without_fastapi(name, *args):
        if name == "eve_vlm.serve.cli":
            raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_fastapi)
    assert main(["serve", "--model", "m", "--port", "1"]) == 2
    assert error_line(capsys) == (
        "eve: error: `eve serve` needs the optional dependency 'fastapi': pip install 'eve-vlm[serve]'"
    )


def test_a_missing_optional_dependency_at_run_time_says_which_extra(monkeypatch, capsys):
    def needs_easy_vqa(args):
        raise ModuleNotFoundError("No module named 'easy_vqa'", name="easy_vqa")

    monkeypatch.setattr("eve_vlm.quickstart.cli.run", needs_easy_vqa)
    assert main(["quickstart"]) == 2
    assert error_line(capsys) == (
        "eve: error: `eve quickstart` needs the optional dependency 'easy_vqa': pip install 'eve-vlm[quickstart]'"
    )


def test_an_import_error_of_the_library_itself_is_not_hidden(monkeypatch):
    def broken(args):
        raise ModuleNotFoundError("No module named 'eve_vlm.nope'", name="eve_vlm.nope")

    monkeypatch.setattr("eve_vlm.quickstart.cli.run", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["quickstart"])
