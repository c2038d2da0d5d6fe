#!/usr/bin/env bash
# The plugin on a real GPU host, without an engine installed: NVML discovery and GPU-shortfall skips,
# preflight with the host's real GPU (config.json files of the seed models placed in a local HF cache),
# GPU leases with CUDA_VISIBLE_DEVICES, and the failure path of a config that passes preflight but whose
# engine is missing (classified MissingDependency). Usage: bash scripts/gpu_plugin_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_plugin_check.sh OUT_DIR}"
cache="$(mktemp -d)"
for pair in MiniMaxAI--MiniMax-M2:minimax-m2 moonshotai--Kimi-K2-Thinking:kimi-k2-thinking zai-org--GLM-4.6:glm-4.6 \
            deepseek-ai--DeepSeek-V3:deepseek-v3 Qwen--Qwen3-235B-A22B-Instruct-2507-FP8:qwen3-235b-a22b-instruct-2507-fp8 \
            Qwen--Qwen3-Coder-480B-A35B-Instruct-FP8:qwen3-coder-480b-a35b-instruct-fp8; do
  repo="${pair%%:*}"; file="${pair##*:}"
  mkdir -p "$cache/models--$repo/snapshots/local" "$cache/models--$repo/refs"
  cp "test/plugin/data/configs/$file.json" "$cache/models--$repo/snapshots/local/config.json"
  echo local > "$cache/models--$repo/refs/main"
done
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv
HF_HUB_CACHE="$cache" PYTEST_MOE_LEASE_DIR="$out/leases" python3 -m pytest test/nightly -p pytest_moe.plugin \
  -p no:cacheprovider -rA --moe-results-dir "$out/results" --junitxml "$out/junit.xml" --moe-server-timeout 120
echo "pytest exit code: $?"
