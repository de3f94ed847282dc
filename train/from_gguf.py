"""A base model from a GGUF file to a plain HF folder (safetensors, fp32), for training and for
the HF side of benchmarks and parity checks.

    python -m edge_annotator.train.from_gguf models/gemma-3-270m-q4_k_m.gguf models/gemma-3-270m-hf

transformers dequantizes the GGUF on load (about a minute for Gemma 3 270M on 2 cores). Only
safetensors are written. The folder is written beside the target and renamed into place, so an
interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Fill a folder beside `final` with write(), then swap it into place: never half-written."""
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_path), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: GGUF file not found")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # the weights are dequantized: save them as the plain fp32 they now are, with no GGUF quantizer
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    return atomic_dir(out, write)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m edge_annotator.train.from_gguf MODEL.gguf OUT_DIR", file=sys.stderr)
        return 2
    print(gguf_to_hf(args[0], args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
