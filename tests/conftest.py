"""Shared fixtures: tiny random checkpoints, each built once per test run.

The checkpoint folders are shared by every test that asks for them: read them, never write into
them (copy one to `tmp_path` first when a test must change it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eve_vlm import EveForCausalLM
from eve_vlm.processing import EveProcessor
from eve_vlm.testing import make_tiny_checkpoint

VERSIONS = ("v2", "v1")


@pytest.fixture(scope="session")
def tiny_v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random EVEv2 checkpoint folder (the inference flavour, seed 0)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v2"), "v2")


@pytest.fixture(scope="session")
def tiny_v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random EVE v1 checkpoint folder (the inference flavour, seed 0)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v1"), "v1")


@pytest.fixture(scope="session", params=VERSIONS)
def tiny_dir(request: pytest.FixtureRequest) -> Path:
    """Each tiny checkpoint folder in turn: the test runs once per model version."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


def load_tiny(path: Path) -> tuple[EveForCausalLM, EveProcessor]:
    return EveForCausalLM.from_pretrained(path).eval(), EveProcessor.from_pretrained(path)


@pytest.fixture(scope="module", params=VERSIONS)
def tiny(request: pytest.FixtureRequest) -> tuple[EveForCausalLM, EveProcessor]:
    """(model in eval mode, processor) of each tiny checkpoint in turn, loaded once per module."""
    return load_tiny(request.getfixturevalue(f"tiny_{request.param}_dir"))


@pytest.fixture(scope="module")
def tiny_v2(tiny_v2_dir: Path) -> tuple[EveForCausalLM, EveProcessor]:
    """(model in eval mode, processor) of the tiny v2 checkpoint, loaded once per module."""
    return load_tiny(tiny_v2_dir)
