"""Quantization-aware LoRA on the base GGUF's own grid (`qat: true` in a training config).

    grids = base_grids(cfg.base_model, model)      # module name -> its matrix's grid in the base GGUF
    attach(model, grids)                           # every LoRA layer's forward sees its weight snapped
    merged = bake(peft_model, grids)               # merge: the snapped weights, the LoRA layers gone

The base this project trains is dequantized from a llama.cpp GGUF (`annotate-cli base`), so each
of its weights is one point of the grid its block was quantized to (hf/quant_grid.py). Quantizing
base + LoRA update again rounds most of the update away: a LoRA step is mostly smaller than half a
4-bit step (docs/export.md). Here the forward pass of each adapted matrix computes W0 + s * B @ A,
snaps it to that grid (the base file's scales kept, each weight's code chosen) and multiplies
with the result; the gradient passes straight through to A and B (`_forward` says how). What is
validated during training is then exactly what the export
writes into the base file's blocks (export/grid_route.py): one file with the base's types and size,
and no rounding after training.

LoRA dropout is not allowed with it: the dropped-out input reaches only the LoRA branch, which
a snapped weight does not keep apart.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import numpy as np

from edge_annotator.hf.quant_grid import LAYOUTS, Grid, gguf_of, gguf_row_order, read_grid, snap, torch_grid
from edge_annotator.runtime.errors import UserError
from edge_annotator.runtime.gguf_file import read_tensor_infos, tensor_data

log = logging.getLogger(__name__)


class NoGrid(UserError, ValueError):
    """The base has no GGUF grid to train on (not made from a GGUF, the file missing, or weights
    that differ from it)."""


def hf_grids(folder: str | Path, hf_names: list[str]) -> tuple[Path, dict[str, Grid]]:
    """The base GGUF FOLDER was made from, and the grid of each HF weight HF_NAMES names, in HF
    row order. NoGrid where there is none."""
    import json

    from edge_annotator.export import mix

    folder = Path(folder)
    path = gguf_of(folder)
    if path is None:
        raise NoGrid(f"{folder}: qat trains on the grid of the GGUF the base was made from (annotate-cli base / "
                     f"from-gguf), and this folder names none found beside it")
    conf = json.loads((folder / "config.json").read_text())
    tmap = mix.name_map(folder)
    tensors = read_tensor_infos(path)
    out: dict[str, Grid] = {}
    for hf in hf_names:
        name = mix.gguf_name(tmap, hf)
        t = tensors.get(name or "")
        if t is None:
            raise NoGrid(f"{path}: no tensor for {hf} (GGUF name {name})")
        if t.qtype not in LAYOUTS:
            raise NoGrid(f"{path}: {name} is {t.qtype.name}, which has no grid to train on "
                         f"(one of {', '.join(x.name for x in LAYOUTS)})")
        g = read_grid(tensor_data(path, t), t.qtype)
        perm = gguf_row_order(conf, hf, g.codes.shape[0])
        if perm is not None:
            g = g.rows(np.argsort(perm))  # HF row h is GGUF row argsort(perm)[h]
        out[hf] = g
    return path, out


def lora_layers(model: Any) -> dict[str, Any]:
    """{HF weight name of the base layer: PEFT LoRA layer} of every adapted linear layer."""
    from peft.tuners.lora import Linear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            hf = name.removeprefix("base_model.model.") + ".weight"
            out[hf] = mod
    return out


def base_grids(folder: str | Path, model: Any) -> dict[str, dict[str, Any]]:
    """Per adapted layer (its HF weight name) the grid its base weight lies on, as torch tensors on
    the model's device; NoGrid where the base weights are not the GGUF's dequantized values."""

    layers = lora_layers(model)
    path, grids = hf_grids(folder, sorted(layers))
    out = {}
    for hf, g in grids.items():
        w0 = layers[hf].base_layer.weight.detach().float().cpu().numpy()
        if w0.shape != g.codes.shape or not np.array_equal(w0, g.dequantize(g.codes)):
            raise NoGrid(f"{folder}: the weight {hf} is not what {path.name} dequantizes to; make the base again "
                         f"from that file (annotate-cli from-gguf) or train without qat")
        out[hf] = torch_grid(g, layers[hf].base_layer.weight.device)
    log.info("qat: %d matrices on the grid of %s", len(out), path.name)
    return out


def snapped_weight(layer: Any, grid: dict[str, Any]) -> Any:
    """The layer's base weight + its LoRA update (PEFT's (B @ A) * scaling), snapped to GRID."""
    name = layer.active_adapters[0]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return snap(layer.base_layer.weight + (b @ a) * layer.scaling[name], grid)


def _forward(layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """A LoRA layer's forward on the grid: x @ snap(W0 + s B A)^T; PEFT's own forward while training
    before the grid is switched on (`train_on_grid`).

    The snapped weight is computed once per update of A and B (their version counters: the
    optimizer updates them in place), so once per optimizer step and once for a whole validation.
    The gradient is straight through: A and B get what they would with W0 + s B A in the forward,
    through PEFT's own LoRA branch added as zero (branch - branch.detach()), on the input detached
    so that the input's gradient is the snapped weight's alone. That is the saturated
    straight-through estimator without its mask (a weight pushed past its block's last code keeps
    a gradient), at the cost of a LoRA step: the full weight gradient the mask needs is never formed."""
    import torch
    import torch.nn.functional as F

    name = layer.active_adapters[0]
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    training = torch.is_grad_enabled() and lora_b.weight.requires_grad
    if training and not layer._edge_on_grid:
        return layer._edge_peft_forward(x, *args, **kwargs)
    key = (id(lora_a.weight), lora_a.weight._version, id(lora_b.weight), lora_b.weight._version)
    if layer._edge_cache is None or layer._edge_cache[0] != key:
        layer._edge_cache = (key, snapped_weight(layer, layer._edge_grid))
    w = layer._edge_cache[1]
    x = x.to(w.dtype)
    y = F.linear(x, w, layer.base_layer.bias)
    if training:
        branch = lora_b(lora_a(x.detach())) * layer.scaling[name]
        y = y + (branch - branch.detach())
    return y


def attach(model: Any, grids: dict[str, dict[str, Any]]) -> Any:
    """Every LoRA layer of MODEL computes on its grid from now on (see the module's docstring)."""
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(grids))
    if missing:
        raise NoGrid(f"no grid for the adapted layers {', '.join(missing[:3])}")
    for hf, layer in layers.items():
        if any(getattr(d, "p", 0.0) > 0 for d in layer.lora_dropout.values()):
            raise NoGrid(f"{hf}: qat needs lora.dropout 0")
        layer._edge_grid = grids[hf]
        layer._edge_cache = None
        layer._edge_on_grid = True
        layer._edge_peft_forward = layer.forward
        layer.forward = types.MethodType(_forward, layer)
    return model


def train_on_grid(model: Any, on: bool) -> None:
    """Whether the training forward pass snaps to the grid (it always does without gradients: the
    validation of what the export writes)."""
    for layer in lora_layers(model).values():
        layer._edge_on_grid = on


def bake(model: Any, grids: dict[str, dict[str, Any]]) -> Any:
    """PEFT MODEL with each adapted layer's base weight replaced by its snapped weight, the LoRA
    layers removed (PEFT's unload: no merge on top)."""
    import torch

    with torch.no_grad():
        for hf, layer in lora_layers(model).items():
            layer.base_layer.weight.copy_(snapped_weight(layer, grids[hf]))
    return model.unload()
