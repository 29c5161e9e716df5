#!/usr/bin/env bash
# GPU benchmark of the real-size setting, offline: for each shipped family (Llama-2-7B, Llama-3.1-8B,
# Mistral-7B-v0.3, Qwen2.5-7B, Gemma-2-9B) a model of the real shape with random weights, built in
# memory on the GPU in bf16 with LoRA (nothing downloaded, no checkpoint written), then
#   - the training step of SFT, SAP and every other registered fine-tuning method, as train.py runs
#     it: mean step time, task tokens/s, peak CUDA memory, each relative to SFT;
#   - the alignment stage's step of every alignment-stage defense (Vaccine, Booster, RepNoise) and of
#     plain SFT alignment (rows align=NAME), as stages.py runs it, relative to fine-tuning SFT's step;
#   - the repairs SafeLoRA (with a second random model as the unaligned one) and Antidote (one forward
#     over the calibration examples): seconds and peak CUDA memory, next to SFT's step;
#   - greedy generation as evaluation runs it: new tokens/s and peak memory.
# Prints three markdown tables; details and settings: benchmarks/gpu_bench.py (its docstring).
# It has never run on a GPU: the time below is estimated from FLOP counts.
#
# On a rented GPU (one H100/H200, 80 GB is enough; should take about 8 minutes, budget 10):
#   bash benchmarks/gpu.sh                  # all families, methods, stage defenses and repairs
#   bash benchmarks/gpu.sh --out results/   # also writes results/gpu_bench.json (after every family)
#   bash benchmarks/gpu.sh --families llama2_7b_chat data.max_length=512   # one family, GSM8K/Alpaca's length
#   bash benchmarks/gpu.sh --families gemma2_9b_it --methods sft,sap,vaccine --repairs none
# The Python environment is the project's (pip install -e .); PYTHON=... picks another interpreter.
# Tiny shapes on the CPU, a smoke test of this script (what tests/test_benchmarks.py runs, ~1 min):
#   TINY=1 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python}

if [[ "${TINY:-0}" != 0 ]]; then
  exec "$PYTHON" benchmarks/gpu_bench.py --tiny "$@"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
  echo "nvidia-smi not found: no NVIDIA GPU visible" >&2
fi
exec "$PYTHON" benchmarks/gpu_bench.py "$@"
