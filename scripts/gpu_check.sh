#!/usr/bin/env bash
# QLoRA NF4 + bf16 training check on a CUDA machine with no network (scripts/gpu_check.py).
# Needs: torch with CUDA, transformers, peft, accelerate, bitsandbytes (carry its wheel), and an HF
# folder with a tokenizer (e.g. models/gemma-3-270m-hf; only its tokenizer and config are read).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHONPATH="${PYTHONPATH:-}" python3 -c "import edge_annotator" 2>/dev/null || pip install --no-deps -e . -q
python3 scripts/gpu_check.py "${1:-models/gemma-3-270m-hf}" --steps "${STEPS:-20}"
