"""`eve export --remote-code`: plain transformers loads the folder without eve_vlm importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eve_vlm import EveForCausalLM
from eve_vlm.export import export_remote_code
from eve_vlm.testing import make_tiny_checkpoint

FIXTURES = Path(os.environ.get("EVE_OFFICIAL_FIXTURES", Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official"))

LOADER = textwrap.dedent(
    """
    import sys, importlib.abc
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "eve_vlm" or name.startswith("eve_vlm."):
                raise ImportError("eve_vlm is hidden")
    sys.meta_path.insert(0, Hide())
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
    assert not any(m.startswith("eve_vlm") for m in sys.modules), "eve_vlm was imported"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(ids).logits
    torch.save(logits, sys.argv[2])
    print(type(model).__module__)
    """
)


def _check(folder: Path, tmp_path: Path) -> None:
    out = export_remote_code(folder, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "eve.EveForCausalLM"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path / "logits.pt")], env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "transformers_modules" in res.stdout
    ours = EveForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        want = ours(torch.tensor([[1, 2, 3, 4]])).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want)


@pytest.mark.slow
def test_our_checkpoint_loads_as_remote_code_without_eve_vlm(tmp_path):
    _check(make_tiny_checkpoint(tmp_path / "m", "v2"), tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not (FIXTURES / "v1" / "config.json").is_file(), reason="official fixture sets not present")
def test_official_checkpoint_loads_as_remote_code_without_eve_vlm(tmp_path):
    _check(FIXTURES / "v1", tmp_path)
