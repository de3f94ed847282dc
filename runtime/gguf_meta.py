"""The annotator's own GGUF metadata, and the checks run on a model file before any work.

Every custom key lives here, under one prefix, so that a `.gguf` file can be the whole annotator:
weights, tokenizer (llama.cpp's own keys), task spec and provenance (ours).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import LlamaModel, ModelError
from .gguf_file import read_strings, read_tensor_infos
from .spec import SpecError, TaskSpec, spec_from_json
from .untrusted import JSONError, loads

log = logging.getLogger(__name__)

PREFIX = "edge_annotator"


class Keys:
    FORMAT = f"{PREFIX}.format_version"
    SPEC = f"{PREFIX}.spec"
    """The task spec, canonical JSON (TaskSpec.to_json)."""
    SPEC_SHA256 = f"{PREFIX}.spec_sha256"
    PROVENANCE = f"{PREFIX}.provenance"
    """JSON: base model, data hash, training config, git commit, export settings."""


FORMAT_VERSION = 1


@dataclass
class ModelInfo:
    path: str
    size_bytes: int
    architecture: str | None
    name: str | None
    quantization: str | None
    context_length: int | None
    n_params: int
    spec: TaskSpec | None
    spec_error: str | None
    provenance: dict[str, Any] | None

    def to_dict(self, sha256: str | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path, "size_bytes": self.size_bytes, "architecture": self.architecture,
            "name": self.name, "quantization": self.quantization, "context_length": self.context_length,
            "n_params": self.n_params,
            "spec": self.spec.to_dict() if self.spec else None,
            "spec_sha256": self.spec.sha256 if self.spec else None,
            "provenance": self.provenance,
        }
        if self.spec_error:
            d["spec_error"] = self.spec_error
        if sha256:
            d["sha256"] = sha256
        return d


def model_info(model: LlamaModel) -> ModelInfo:
    """What a loaded model says about itself: llama.cpp's keys and ours."""
    from gguf import LlamaFileType

    p = model.path
    arch = model.meta("general.architecture")
    ft = model.meta("general.file_type")
    try:
        quant = LlamaFileType(int(ft)).name.removeprefix("MOSTLY_") if ft is not None else None
    except ValueError:
        quant = f"file_type {ft}"
    spec, spec_error = None, None
    raw_spec = model.meta(Keys.SPEC)
    if raw_spec is not None:
        try:
            spec = spec_from_json(raw_spec, f"{p} [{Keys.SPEC}]")
        except SpecError as e:
            spec_error = str(e)
    prov = model.meta(Keys.PROVENANCE)
    try:
        provenance = loads(prov) if prov else None
    except JSONError:
        provenance = {"unparsed": (prov or "")[:2000]}
    ctx = model.meta(f"{arch}.context_length") if arch else None
    return ModelInfo(path=str(p), size_bytes=p.stat().st_size, architecture=arch, name=model.meta("general.name"),
                     quantization=quant, context_length=int(ctx) if ctx and ctx.isdigit() else None,
                     n_params=model.n_params, spec=spec, spec_error=spec_error, provenance=provenance)


def read_model_info(path: str | Path, base: str | Path | None = None) -> ModelInfo:
    """Load a model file (checking it is a whole, loadable GGUF) and describe it; BASE: an adapter
    file's base GGUF where it is not beside it."""
    model = LlamaModel(path, base=base)
    try:
        return model_info(model)
    finally:
        model.close()


def embedded_spec(path: str | Path) -> TaskSpec:
    """The task spec a GGUF embeds, read from its metadata alone: no weights are loaded, so an
    adapter annotator's base need not be at hand (convert, select, agree and data import read only
    the spec)."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size < 4:
        raise ModelError(f"{p}: not a GGUF file" if p.is_file() else f"{p}: model file not found")
    raw = read_strings(p, {Keys.SPEC}).get(Keys.SPEC)
    if raw is None:
        raise ModelError(f"{p}: this GGUF has no embedded task spec ({Keys.SPEC}); give --spec SPEC.yaml")
    return spec_from_json(raw, f"{p} [{Keys.SPEC}]")


def resolve_spec(info: ModelInfo, override: TaskSpec | None) -> TaskSpec:
    """The spec to annotate with: --spec if given (zero-shot use of a base model), else the embedded one."""
    if override is not None:
        if info.spec is not None and info.spec.sha256 != override.sha256:
            log.warning("%s embeds spec '%s'; using the --spec given instead", info.path, info.spec.name)
        return override
    if info.spec_error:
        raise ModelError(info.spec_error)
    if info.spec is None:
        raise ModelError(f"{info.path}: this GGUF has no embedded task spec ({Keys.SPEC}); pass --spec "
                         f"tasks/NAME.yaml to use it zero-shot, or export a fine-tuned annotator")
    return info.spec


def block_matrices(path: str | Path) -> dict[str, Any]:
    """The blocks' matrices of a GGUF (`blk.*` tensors of two dimensions, from its tensor directory):
    how many, their share of the elements by type, and bits a weight (bytes x 8 over elements). For
    a LoRA adapter file these are its A and B factors."""
    el, by, n = 0, 0, 0
    types: dict[str, int] = {}
    for t in read_tensor_infos(path).values():
        if t.name.startswith("blk.") and len([d for d in t.shape if d > 1]) == 2:
            n += 1
            el += t.n_elements
            by += t.n_bytes
            types[t.qtype.name] = types.get(t.qtype.name, 0) + t.n_elements
    return {"matrices": n, "elements": el, "bytes": by, "bits_per_weight": round(8 * by / el, 3) if el else 0.0,
            "types": {k: round(v / el, 4) for k, v in sorted(types.items(), key=lambda kv: -kv[1])} if el else {}}


def describe_blocks(b: dict[str, Any]) -> str:
    """E.g. '168 matrices: Q4_K 52%, Q5_0 24%, Q6_K 24%; 5.43 bits/weight'."""
    shares = ", ".join(f"{k} {v:.0%}" for k, v in b["types"].items())
    return f"{b['matrices']} matrices: {shares}; {b['bits_per_weight']:.2f} bits/weight"
