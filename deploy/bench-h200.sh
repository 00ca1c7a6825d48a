#!/usr/bin/env bash
# The GPU benchmark of record: one H200, a random-weight LLaVA-NeXT-8B-shaped model in bf16
# (Llama-3-8B text tower, CLIP-L/336 vision tower, AnyRes) with a random 131072 x 4096 TopK SAE
# (k 256) at block 24, all built from configs on the GPU: nothing is downloaded, fastapi is not
# needed. Runs from a source checkout with the machine's own torch and transformers.
# Usage: deploy/bench-h200.sh [OUT_DIR]     (writes h200.json, h200.md and pytest.log there)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/lmm-steer-bench}}
mkdir -p "$out"
export PYTHONPATH="$PWD/server:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"
# The engine and model tests, CUDA-only ones included, on this machine's torch/transformers versions
# (pass ALL_TESTS=1 for the whole suite).
# The GPU image lacks num2words (SmolVLM's processor needs it), so without it the SmolVLM cases are
# deselected, and the log says so.
tests=${ALL_TESTS:+tests}
select=()
python3 -c "import num2words" 2>/dev/null || select=(-k "not smolvlm")
echo "pytest selection: ${select[*]:-all}" | tee "$out/pytest.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider ${tests:-tests/test_engine.py tests/test_builtin_models.py \
  tests/test_step_profile.py} "${select[@]}" 2>&1 | tail -n 15 | tee -a "$out/pytest.log"
# --compile adds rows for engines whose blocks and steering edit go through torch.compile (compile
# time excluded); a failure there is reported as an error row and costs none of the other rows.
timeout 420 python3 -m lmm_steer.cli bench --model builtin:random-llava-next-8b \
  --sae builtin:random-topk:latents=131072,k=256 --hookpoint model.layers.24 \
  --batch 1,8,32 --clamps 16 --new-tokens 128 --prompt-tokens 128 --image --hf-max-batch 8 --compile \
  --json "$out/h200.json" --markdown "$out/h200.md"
