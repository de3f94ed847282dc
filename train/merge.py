"""Merge the best adapter into the base weights and save a plain HF folder.

    python -m edge_annotator.train.merge RUN_DIR CONFIG.yaml

The base is loaded again from disk in fp32 (bf16 if the config computes in bf16), never from
NF4: merging into 4-bit weights and upcasting would bake the quantization error into the result.
The folder holds safetensors, the tokenizer, the task spec (spec.json, canonical form, and the
original YAML) and provenance.json (data hash, config, git commit, validation alpha).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from edge_annotator.runtime.files import atomic_dir
from edge_annotator.runtime.spec import load_spec

from .config import TrainConfig
from .examples import data_sha256
from .model import load_tokenizer, save_tokenizer


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def merge(cfg: TrainConfig, run_dir: str | Path, out_dir: str | Path | None = None,
          extra_provenance: dict[str, Any] | None = None) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = Path(run_dir)
    out = Path(out_dir) if out_dir else run / "merged"
    base_dir = run / "base" if cfg.tiny else Path(cfg.base_model)
    dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
    if getattr(base, "hf_quantizer", None) is not None:
        raise ValueError(f"{base_dir}: the base loads quantized ({base.config.quantization_config}); merging "
                         f"needs plain 16/32-bit weights: remake it with python -m edge_annotator.train.from_gguf")
    peft = PeftModel.from_pretrained(base, run / "best-adapter")
    if cfg.qat:  # the weights training saw: base + update snapped to the base GGUF's grid
        from .qat import bake, base_grids

        merged = bake(peft, base_grids(base_dir, peft))
    else:
        merged = peft.merge_and_unload()
    tok = load_tokenizer(base_dir)
    spec = load_spec(cfg.spec)
    provenance = {
        "base_model": str(cfg.base_model) if not cfg.tiny else f"tiny from scratch ({asdict(cfg.tiny)})",
        "train_data": cfg.train_data, "val_data": cfg.val_data,
        "data_sha256": data_sha256(cfg.train_data, cfg.val_data),
        "config": asdict(cfg), "git_commit": git_commit(),
        "spec_sha256": spec.sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra_provenance or {}),
    }

    def write(d: Path) -> None:
        merged.save_pretrained(d, safe_serialization=True)
        save_tokenizer(tok, base_dir, d)
        (d / "spec.json").write_text(spec.to_json())
        shutil.copy(cfg.spec, d / "spec.yaml")
        (d / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))

    return atomic_dir(out, write)
