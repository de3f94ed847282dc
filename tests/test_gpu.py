"""QLoRA NF4 with bf16 compute on a CUDA GPU (scripts/gpu_check.py); skipped where there is none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_qlora_trains_and_merges_on_gpu(gemma_hf: Path) -> None:
    from gpu_check import check  # scripts/

    assert check(gemma_hf, 10, "cuda") == 0
