"""The child process of the AMX probe (runtime/cpu.py: probe): load MODEL with llama.cpp's default
buffer types and decode one batch. Exit 0 means this build's kernels ran on this CPU; a crash
(SIGSEGV in the AMX kernels, llama.cpp PR #26954) kills only this child.

    python -m edge_annotator.runtime.probe models/gemma-3-270m-q4_k_m.gguf && echo decoded
"""

from __future__ import annotations

import click
import numpy as np

from .engine import LlamaEngine


def _decode(model: str) -> None:
    """The child's work: load with the defaults and decode one batch of 32 tokens."""
    with LlamaEngine(model, n_ctx=256, answer_head=False, extra_buffers=True) as eng:
        toks = eng.tokenize("The committee reviewed every answer twice before anyone compared the scores.")
        toks = (toks * 4)[:32]
        eng.decode_rows(toks, list(range(len(toks))), [(0,)] * len(toks), {len(toks) - 1: np.arange(2)})


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
def decode(model: str) -> None:
    """The probe's child: load MODEL with llama.cpp's default buffers and decode one batch.

    \b
    Example:
      python -m edge_annotator.runtime.probe models/gemma-3-270m-q4_k_m.gguf && echo decoded
    """
    _decode(model)


if __name__ == "__main__":
    decode()
