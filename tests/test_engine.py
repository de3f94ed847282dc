"""runtime/engine.py: who frees a model, and what a build without a GPU backend says."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_annotator.runtime.engine import LlamaEngine, LlamaModel, ModelError, backend_info
from edge_annotator.runtime.llama_lib import gpu_offload_supported

pytestmark = pytest.mark.slow


def test_an_engine_frees_the_model_it_loaded_and_never_one_it_was_handed(gemma_path: Path) -> None:
    model = LlamaModel(gemma_path)
    with LlamaEngine(model, n_ctx=256, n_threads=1) as eng:
        ids = eng.tokenize("Hello world")
    assert model.ptr and model.tokenize("Hello world") == ids  # still the caller's, still usable
    with LlamaEngine(model, n_ctx=256, n_threads=1) as eng:  # a second engine on the same model
        assert eng.tokenize("Hello world") == ids
    model.close()
    own = LlamaEngine(gemma_path, n_ctx=256, n_threads=1)
    own.close()
    assert not own.model.ptr


def test_backend_is_reported_and_gpu_layers_need_a_gpu_build(gemma_path: Path) -> None:
    info = backend_info()
    assert info["gpu_offload"] == gpu_offload_supported() and "CPU" in info["system"]
    if not gpu_offload_supported():
        with pytest.raises(ModelError, match="runs on the CPU only"):
            LlamaModel(gemma_path, n_gpu_layers=-1)
        assert LlamaModel(gemma_path, vocab_only=True, n_gpu_layers=-1).n_vocab > 0  # the tokenizer alone
