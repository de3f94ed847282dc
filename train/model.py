"""Base model and LoRA (QLoRA as a flag).

    model = add_lora(load_base(cfg, device), cfg)

The forward pass training uses is hf/tree.py's: the decoder over a packed token tree, then
the vocabulary head for the allowed answer tokens only (on a CPU Gemma 3's 262,144 x 640 head
would otherwise cost more than every other layer together).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig

log = logging.getLogger(__name__)


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def dtype_of(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


TOKENIZER_FILES = ("tokenizer.model",)
"""Files of a tokenizer that save_pretrained may not write back (a tokenizers-backed tokenizer
built from a SentencePiece model keeps only tokenizer.json), yet llama.cpp's converter reads
first: they travel from the base folder to every folder made from it."""


def save_tokenizer(tok: Any, src: str | Path, dst: str | Path) -> None:
    """tok.save_pretrained(dst), and the base folder's TOKENIZER_FILES copied beside it."""
    import shutil

    tok.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file() and not (Path(dst) / name).is_file():
            shutil.copy(Path(src) / name, Path(dst) / name)


def build_tiny(cfg: TrainConfig) -> Any:
    """A small model of the base's architecture and vocabulary, randomly initialised with cfg.seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert cfg.tiny is not None
    conf = AutoConfig.from_pretrained(cfg.base_model)
    t = cfg.tiny
    conf.num_hidden_layers = t.layers
    conf.hidden_size = t.hidden
    conf.intermediate_size = t.intermediate
    conf.num_attention_heads = t.heads
    conf.num_key_value_heads = t.kv_heads
    conf.head_dim = t.head_dim
    if getattr(conf, "model_type", "").startswith("gemma3") and getattr(conf, "layer_types", None) is not None:
        # Gemma 3's pattern (five sliding-window layers, then one global), which llama.cpp assumes
        # whatever the layer count: GGUF has no per-layer key for it, and a 2-layer model of global
        # layers would run on the other RoPE base there.
        conf.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(t.layers)]
    elif getattr(conf, "layer_types", None) is not None:  # Qwen3: one type per layer, all full attention here
        conf.layer_types = [conf.layer_types[0]] * t.layers
    if hasattr(conf, "query_pre_attn_scalar"):
        conf.query_pre_attn_scalar = t.head_dim
    for k in ("quantization_config",):
        if hasattr(conf, k):
            delattr(conf, k)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, t.embed_std)
    return model


def load_base(cfg: TrainConfig, device: torch.device, folder: str | Path | None = None) -> Any:
    """The frozen base: fp32/bf16 weights, or NF4-quantized ones for QLoRA (bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    src = folder or cfg.base_model
    kwargs: dict[str, Any] = {"dtype": dtype_of(cfg), "use_safetensors": True}  # never a pickle
    if cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype_of(cfg),
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model: Any = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    if cfg.quantization != "nf4":
        model.to(device)
    return model


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    if cfg.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                    target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM", bias="none",
                    layers_to_transform=list(cfg.lora.layers) if cfg.lora.layers is not None else None,
                    modules_to_save=list(cfg.lora.modules_to_save) or None)
    return get_peft_model(model, lc)
