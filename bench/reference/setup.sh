#!/usr/bin/env bash
# The PyTorch reference stack (torch, transformers, AdapterHub `adapters`, PEFT) in a virtual
# environment, to measure the project side by side with what users would pick instead.
#   bench/reference/setup.sh VENV_DIR        (e.g. target/ref-venv: git-ignored, ~3 GB, a few minutes)
# Then, from the project root, with the models fetched by `cargo xtask fetch`:
#   REF_MODELS=models VENV_DIR/bin/python bench/reference/torch_bench.py list
#   REF_MODELS=models VENV_DIR/bin/python bench/reference/torch_bench.py run minilm_train_interleaved --warmup 1 --steps 3
# Each run prints one JSON line (median ms per step, peak RSS, sgemm probe of the machine's speed).
set -euo pipefail
venv=${1:?usage: setup.sh VENV_DIR}
here=$(cd "$(dirname "$0")" && pwd)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$here/requirements.txt"
"$venv/bin/python" -c "import torch, transformers, adapters, peft; print('reference stack ready:', torch.__version__, transformers.__version__, adapters.__version__, peft.__version__)"
