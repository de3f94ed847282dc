"""Which tensors a quantizer may round hard, and how much each input column matters.

Two inputs to llama.cpp's quantizer (llama_model_quantize_params) that the export computes:

- tensor type overrides: the tensors LoRA changed, by their GGUF names, kept at a wider type
  (`--adapted-type`, default Q8_0). A LoRA update is mostly smaller than half a 4-bit step
  (Q4_K: 16 levels per block of 32), so quantizing the merged weight to 4 bits rounds much of the
  fine-tuning away. Measured on Gemma 3 270M (docs/export.md): with every tensor at Q4_K_M the
  file's labels agreed with the merged model's at alpha -0.16..-0.22; keeping the adapted tensors
  at Q8_0 restores parity, for a few MB.
- an importance matrix (`--imatrix CALIB.jsonl`): for every linear layer, the mean square of each
  input column over calibration prompts in the task's own format (what llama.cpp's
  `llama-imatrix` tool computes), so that the quantizer spends its error where activations are small.

GGUF tensor names come from gguf-py's TensorNameMap for the model's architecture, the same table
llama.cpp's converter uses.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edge_annotator.runtime.errors import UserError

from .quants import QUANTS

# HF architectures this maps (the families users bring: Qwen3, Llama 3.x, Gemma 3)
ARCHS = {
    "Gemma3ForCausalLM": "GEMMA3", "Gemma3ForConditionalGeneration": "GEMMA3",
    "Qwen3ForCausalLM": "QWEN3", "Qwen2ForCausalLM": "QWEN2",
    "LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA",
}


class MixError(UserError, RuntimeError):
    pass


def _config(merged: Path) -> dict[str, Any]:
    return json.loads((merged / "config.json").read_text())


def name_map(merged: Path) -> Any:
    """gguf-py's HF-to-GGUF tensor name table for the merged model's architecture."""
    import gguf

    conf = _config(merged)
    arch = next((ARCHS[a] for a in conf.get("architectures", []) if a in ARCHS), None)
    if arch is None:
        raise MixError(f"{merged / 'config.json'}: architecture {conf.get('architectures')} is not one of "
                       f"{', '.join(sorted(ARCHS))}; export with --adapted-type same and no --imatrix")
    text = conf.get("text_config", conf)
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), int(text["num_hidden_layers"]))


def hf_weight_sizes(merged: Path) -> dict[str, int]:
    """{HF tensor name: number of weights}, from the safetensors headers alone."""
    from safetensors import safe_open

    out: dict[str, int] = {}
    for f in sorted(merged.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                out[k] = int(np.prod(st.get_slice(k).get_shape()))
    return out


def gguf_name(tmap: Any, hf_name: str) -> str | None:
    got = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    return str(got) if got else None


_LAYER = re.compile(r"\blayers\.(\d+)\.")


def adapted_tensors(merged: Path, sizes: dict[str, int]) -> dict[str, int]:
    """{GGUF name: number of weights} of the weights the LoRA adapter changed (provenance.json's
    config: its target modules, in the decoder layers `lora.layers` names where it names them, and
    its modules_to_save), given SIZES, the merged model's {HF name: number of weights}
    (hf_weight_sizes)."""
    prov_file = merged / "provenance.json"
    if not prov_file.is_file():
        return {}
    lora = json.loads(prov_file.read_text()).get("config", {}).get("lora", {})
    targets, saved = set(lora.get("target_modules", [])), set(lora.get("modules_to_save", []))
    layers = lora.get("layers")  # None: every layer
    if not targets | saved:
        return {}

    def changed(name: str) -> bool:
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if module in saved:
            return True
        # model.layers.N.self_attn.q_proj: a target in a layer the adapter left alone kept its weights
        layer = _LAYER.search(name)
        return module in targets and (layers is None or (layer is not None and int(layer[1]) in layers))

    tmap = name_map(merged)
    out = {}
    for name, n in sizes.items():
        if name.endswith(".weight") and changed(name):
            g = gguf_name(tmap, name)
            if g is None:
                raise MixError(f"{merged}: no GGUF name for the adapted weight {name}")
            out[g] = n
    return dict(sorted(out.items()))


def tensor_overrides(names: list[str], type_name: str) -> Any:
    """A NULL-terminated llama_model_tensor_override array keeping NAMES at TYPE_NAME."""
    import llama_cpp

    arr = (llama_cpp.llama_model_tensor_override * (len(names) + 1))()
    keep = [("^" + re.escape(n) + "$").encode() for n in names]
    tensor_type = QUANTS[type_name].tensor_type
    if tensor_type is None:
        raise MixError(f"{type_name} is not a type one tensor can keep")
    for i, pat in enumerate(keep):
        arr[i].pattern = pat
        arr[i].type = int(tensor_type)
    arr[len(names)].pattern = None
    arr._keep = keep  # type: ignore[attr-defined]  # the bytes must outlive the call
    return arr


def imatrix_array(imatrix: dict[str, Any]) -> Any:
    """A NULL-terminated llama_model_imatrix_data array from {gguf tensor name: float32 vector}."""
    import llama_cpp

    arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep = []
    for i, (name, vec) in enumerate(sorted(imatrix.items())):
        v = np.ascontiguousarray(vec, dtype=np.float32)
        keep.append((name.encode(), v))
        arr[i].name = keep[-1][0]
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(imatrix)].name = None
    arr._keep = keep  # type: ignore[attr-defined]
    return arr


def compute_imatrix(merged: Path, calib: Path, max_items: int = 32, max_tokens: int = 512) -> dict[str, Any]:
    """Mean squared input activation per column of every linear layer, over calibration prompts.

    The prompts are the task's own (runtime/prompt.py), one criterion per item in turn, each with
    its answer, so the statistics see what the annotator will run on. Returns {GGUF name: vector}.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_annotator.runtime.data import check_item, iter_rows
    from edge_annotator.runtime.prompt import render_prompt
    from edge_annotator.runtime.spec import spec_from_json

    spec = spec_from_json((merged / "spec.json").read_text(), str(merged / "spec.json"))
    prompts: list[str] = []
    for row in iter_rows(calib):
        if len(prompts) >= max_items:
            break
        c = spec.criteria[len(prompts) % len(spec.criteria)]
        prompts.append(render_prompt(spec, check_item(row, spec).fields, c))
    if not prompts:
        raise MixError(f"{calib}: no calibration items")
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, use_safetensors=True).eval()
    tmap = name_map(merged)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            g = gguf_name(tmap, mod_name + ".weight")
            if g is None or not g.startswith("blk."):
                continue

            def hook(_m: Any, args: tuple[Any, ...], g: str = g) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[g] = sums.get(g, 0) + (x * x).sum(0)
                counts[g] = counts.get(g, 0) + x.shape[0]

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for p in prompts:
                ids = tok(p, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {g: (sums[g] / counts[g]).float().numpy().astype(np.float32) for g in sums}
