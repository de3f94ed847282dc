"""Tiny base folders of the architectures users bring, built in code: Qwen3 (tied or untied output
layer, q/k norms) and Llama 3 (untied, llama3 rope_scaling), with grouped-query attention.

    base = tiny_base("qwen3", "models/tiny-qwen3", tied=True)     # an HF folder: config, weights, tokenizer
    raw["base_model"] = str(base)                                   # then train, export, parity as usual

No Qwen3 or Llama weights or tokenizers can be had offline, so the tokenizer is trained here: a
SentencePiece BPE model of 1,000 pieces with byte fallback, on the shipped data's texts and the
shipped specs (so every prompt tokenizes into known pieces). Why this one:

- llama.cpp's converter reads `tokenizer.model` (SentencePiece) first for both architectures, and
  llama.cpp's SPM tokenizer then splits text exactly as SentencePiece does;
- Gemma 3's vocabulary (262,144 pieces) would make a 64-wide model mostly embedding and its
  export slow; 1,000 pieces keep the tiny models tiny;
- the HF side is the same model as a `tokenizers` BPE (tokenizer.json, loaded as it is, not by a
  tokenizer class that rebuilds it): a leading space becomes "▁" and SentencePiece's dummy prefix
  is prepended, as llama.cpp does (transformers' own LlamaTokenizer splits leading spaces
  differently; hf/tokcheck.py would refuse it).

The weights are random (seeded); `tiny:` in a training config then rebuilds them at the size it
asks for (train/model.py: build_tiny), keeping this folder's architecture and tokenizer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edge_annotator.runtime.errors import UserError

ARCHS = ("qwen3", "llama3")
VOCAB = 1000
SOURCES = ("emobank-train-5000.jsonl", "convabuse-train-300.jsonl", "goemotions-train-300.jsonl")


def _corpus(root: Path) -> str:
    texts: list[str] = []
    for name in SOURCES:
        for line in (root / "data" / name).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            texts.extend(v for k, v in rec.items() if isinstance(v, str) and k != "id")
    texts.extend(p.read_text(encoding="utf-8") for p in sorted((root / "tasks").glob("*.yaml")))
    return "\n".join(t.replace("\n", " ") for t in texts)


def train_tokenizer(out: Path, root: Path | None = None) -> Path:
    """OUT/tokenizer.model (SentencePiece BPE, byte fallback, digits split) and the same tokenizer as
    OUT/tokenizer.json with a dummy prefix, BOS <s> = 1 added, EOS </s> = 2, pad = 3."""
    import sentencepiece as spm

    root = root or Path(__file__).resolve().parents[1]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(_corpus(root), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tok"), vocab_size=VOCAB, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, split_digits=True, add_dummy_prefix=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
        shutil.copy(Path(tmp) / "tok.model", out / "tokenizer.model")
    # transformers converts the SentencePiece model to a `tokenizers` BPE (vocabulary and merges); its
    # LlamaTokenizer then rebuilds the pre-tokenizer its own way, so the JSON gets SentencePiece's own
    # handling (the dummy prefix, every space a "▁") and is loaded as it is
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        src, conv = Path(tmp) / "src", Path(tmp) / "conv"
        src.mkdir()
        shutil.copy(out / "tokenizer.model", src / "tokenizer.model")
        (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False,
                                                               "bos_token": "<s>", "eos_token": "</s>",
                                                               "unk_token": "<unk>", "pad_token": "<pad>"}))
        AutoTokenizer.from_pretrained(src).save_pretrained(conv)
        tj = json.loads((conv / "tokenizer.json").read_text(encoding="utf-8"))
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    bos, a, b = ({"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}})
    tj["post_processor"] = {"type": "TemplateProcessing", "single": [bos, a], "pair": [bos, a, b],  # BOS first,
                            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}  # as llama.cpp
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "clean_up_tokenization_spaces": False, "model_max_length": 4096}, indent=1))
    return out


def tiny_config(arch: str, tied: bool, vocab: int, hidden: int = 64) -> Any:
    """A 2-layer config of ARCH with 4 query heads over 2 key/value heads (GQA), HIDDEN wide (the
    MLP twice that). 64 by default; 256 makes every matrix's rows whole K-quant blocks, so that
    llama.cpp's Q4_K_M gives it Q4_K and Q6_K rather than their 32-weight fallbacks."""
    from transformers import LlamaConfig, Qwen3Config

    common: dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=hidden // 4,
                                  max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                  tie_word_embeddings=tied)
    if arch == "qwen3":
        return Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                           rms_norm_eps=1e-6)
    if arch == "llama3":
        return LlamaConfig(**common, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 1024})
    raise UserError(f"{arch}: choose one of {', '.join(ARCHS)}")


def tiny_base(arch: str, out: str | Path, tied: bool = False, seed: int = 0, hidden: int = 64) -> Path:
    """An HF base folder of ARCH (see the module's docstring): config, random fp32 safetensors, tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    train_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied, VOCAB, hidden), dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.25)  # as build_tiny: answers can reach logits of ~15
    model.save_pretrained(out, safe_serialization=True)
    return out
