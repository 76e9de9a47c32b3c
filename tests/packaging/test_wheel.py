"""The wheel works as well as the checkout: built, installed in a fresh virtual environment, and
run from a folder outside the checkout (no recipes/ or src/ to fall back on)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding the wheel; torch and the other dependencies come from this machine's
    site-packages (the venv sees them, nothing is downloaded)."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        cwd=root, env=dict(os.environ))
    wheels = list(dist.glob("eve_vlm-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = root / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], cwd=root, env=dict(os.environ))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    env["EVE_CACHE_DIR"] = str(root / "cache")
    run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheels[0])],
        cwd=root, env=env)
    return env_dir, env


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_checkout(venv: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    env_dir, env = venv
    py, eve = str(env_dir / "bin" / "python"), str(env_dir / "bin" / "eve")
    where = run([py, "-c", "import eve_vlm; print(eve_vlm.__file__)"], cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(env_dir), f"the checkout was imported, not the wheel: {where}"

    assert "quickstart" in run([eve, "--help"], cwd=tmp_path, env=env).stdout
    listed = run([eve, "recipes"], cwd=tmp_path, env=env).stdout
    for name in ("eve_v1/1_prealign", "eve_v2/2_fullalign", "tiny/eve_v2/1_vision", "quickstart/3_sft"):
        assert name in listed

    out = tmp_path / "tiny-run"
    run([eve, "train", "tiny/eve_v2/1_vision", "--set", f"output_dir={out}", "--set", "max_steps=2"], cwd=tmp_path, env=env)
    assert (out / "final" / "model.safetensors").is_file() and (out / "summary.json").is_file()


@pytest.mark.slow
def test_the_wheel_quickstart_finds_every_asset(venv: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """The quickstart's set-up (SmolLM2 conversion, easy-VQA data, the EfficientNet teacher, its
    recipes) completes and stage 1 starts training; then the run is stopped."""
    env_dir, env = venv
    log = tmp_path / "quickstart.log"
    with log.open("w") as f:
        proc = subprocess.Popen([str(env_dir / "bin" / "eve"), "quickstart", "--out", str(tmp_path / "qs")],
                                cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                if "quickstart-1_prealign" in log.read_text() and (tmp_path / "qs" / "1_prealign").is_dir():
                    break
                time.sleep(1)
        finally:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "quickstart-1_prealign" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert (tmp_path / "qs" / "data" / "qa.jsonl").is_file()
