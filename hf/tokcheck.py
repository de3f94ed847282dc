"""Does an HF tokenizer split text exactly as the GGUF's own vocabulary does (llama.cpp)?

Training learns from the HF tokenizer's ids and annotate-cli runs on llama.cpp's. When they differ
the model is trained on token sequences it never sees at run time, and nothing else notices:
transformers 5.17's GGUF conversion of Gemma 3 encodes a 19-token sentence in 96 tokens (every
example then exceeded max_length and the run "trained" on nothing).

Two checks, both before any work is done:
- `from_gguf` compares the converted tokenizer with the GGUF's vocabulary, loaded by llama.cpp with
  `vocab_only` (no weights), on PROBES and the shipped specs' prompts, refuses on any difference,
  and writes the texts with llama.cpp's ids into the folder (FINGERPRINT);
- training re-tokenizes those texts with the base folder's tokenizer and stops before step 1 on a
  difference (a tokenizer.json edited or replaced after the conversion, a transformers upgrade).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_annotator.runtime.errors import UserError

FINGERPRINT = "edge_annotator_tokenizer.json"

# Where tokenizers disagree in practice: whitespace runs and newlines (SentencePiece's "▁" and
# llama.cpp's space handling), digits (split one by one or not), punctuation and symbols, byte
# fallback for characters outside the vocabulary, scripts other than Latin, and text that looks
# like a special token (it must stay plain text; "</s>", a plain vocabulary entry in Gemma's HF
# tokenizer and a control token in llama.cpp's, is still matched whole by HF and is left out).
PROBES: tuple[str, ...] = (
    "Rate the emotion that a reader feels when reading the sentence below. Hello world, unbelievable!",
    "  two leading spaces,   three inside,\ttab\nnewline\n\nblank line  ",
    "Digits 0123456789, 3.14159, -42, 1,000,000 and 2026-11-27T21:00:00Z",
    "Punctuation: \"quotes\" 'single' (parens) [brackets] {braces} <angle> ... -- — – ; ? !! @#$%^&*_+=|\\/~`",
    "Ümlaute, café, naïve, Straße, ½ ¾ €, emoji 😀👍🏽, rare ꙮ and \u200bzero-width",
    "中文句子，日本語の文、한국어 문장, русский текст, ελληνικά, עברית, العربية, हिन्दी",
    "<start_of_turn>user literal <bos> and <eos> text [INST] stays text",
    "Valence (1-5): 3\nArousal (1-5):",
)


def _spec_prompts(tasks: Path | None) -> list[str]:
    """Each shipped spec's prompt for one sample item, criterion by criterion."""
    from edge_annotator.runtime.assets import shipped_dir
    from edge_annotator.runtime.prompt import render_prompt
    from edge_annotator.runtime.spec import load_spec

    folder = tasks or shipped_dir("tasks")
    out: list[str] = []
    for f in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        spec = load_spec(f)
        item = {i.name: f"An example {i.name}, with punctuation!  And 2 spaces." for i in spec.inputs}
        out.extend(render_prompt(spec, item, c) for c in spec.criteria)
    return out


def probe_texts(tasks: Path | None = None) -> list[str]:
    return list(PROBES) + _spec_prompts(tasks)


def differences(texts: Sequence[str], expected: Sequence[Sequence[int]], hf: Callable[[str], list[int]]
                ) -> list[str]:
    """One line per text the HF tokenizer splits differently: where, and the two lengths."""
    out = []
    for t, want in zip(texts, expected):
        got = hf(t)
        if got != list(want):
            k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            out.append(f"{t[:40]!r}...: {len(got)} tokens, llama.cpp {len(want)} (first difference at token {k})")
    return out


def gguf_ids(gguf: Path, texts: Sequence[str]) -> list[list[int]]:
    """llama.cpp's ids for each text, BOS as the GGUF says, from its vocabulary alone."""
    from edge_annotator.runtime.engine import LlamaModel

    m = LlamaModel(gguf, vocab_only=True)
    try:
        return [m.tokenize(t) for t in texts]
    finally:
        m.close()


def check_against_gguf(tokenizer: Any, gguf: Path, tasks: Path | None = None, source: str | None = None
                       ) -> dict[str, Any]:
    """The fingerprint to write, or TokenizerMismatch naming how the HF tokenizer differs.
    `source`: the folder the tokenizer came from, when it was not converted from the GGUF."""
    from .score import hf_tokenize

    texts = probe_texts(tasks)
    ids = gguf_ids(gguf, texts)
    diff = differences(texts, ids, hf_tokenize(tokenizer))
    if diff:
        what = f"the HF tokenizer from {source}" if source else f"the HF tokenizer converted from {gguf}"
        fix = ("it is not this model's tokenizer" if source else
               "this transformers version converts this model's tokenizer wrongly: pass the model's own "
               "tokenizer.json folder with --tokenizer DIR")
        raise TokenizerMismatch(f"{what} splits {len(diff)} of {len(texts)} probe texts differently from llama.cpp "
                                f"(e.g. {diff[0]}); {fix}")
    return {"gguf": gguf.name, "texts": texts, "ids": ids}


def check_folder(folder: Path, tokenizer: Any) -> str | None:
    """Against the fingerprint from_gguf wrote: None when it matches, or what differs. A folder with
    no fingerprint (a user's own HF checkpoint, whose tokenizer is the model's own) is not checked."""
    fp = folder / FINGERPRINT
    if not fp.is_file():
        return None
    return check_record(json.loads(fp.read_text()), folder, tokenizer)


def check_record(rec: dict[str, Any], folder: Path, tokenizer: Any) -> str | None:
    """check_folder on a fingerprint already read from `folder`."""
    from .score import hf_tokenize

    diff = differences(rec["texts"], rec["ids"], hf_tokenize(tokenizer))
    if not diff:
        return None
    return (f"{folder}'s tokenizer splits {len(diff)} of {len(rec['texts'])} texts differently from "
            f"{rec['gguf']}'s vocabulary (llama.cpp), which annotate-cli runs on (e.g. {diff[0]}); convert the "
            f"base again with python -m edge_annotator.train.from_gguf, or restore its tokenizer files")


class TokenizerMismatch(UserError, RuntimeError):
    pass
