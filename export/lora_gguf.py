"""The annotator as a LoRA adapter GGUF over the untouched base GGUF (runtime/adapter_file.py reads it).

    job = export_adapter("RUN/merged", "annotator.gguf", "models/gemma-3-270m-q4_k_m.gguf")

The base this project trains on is dequantized from that GGUF, so base file + adapter is the
trained model itself: the base keeps llama.cpp's own Q4_K_M blocks (5.43 bits a weight for Gemma 3
270M) and the update is not rounded to them. The adapter's A and B matrices (PEFT's best adapter,
RUN/best-adapter) go out as llama.cpp's LoRA format: per adapted matrix `NAME.lora_a` (r x in)
and `NAME.lora_b` (out x r) under the base's GGUF tensor names, `adapter.lora.alpha` (llama.cpp
scales by alpha / r, as PEFT does), at F16 by default. Llama's q and k projections are stored by
llama.cpp's converter with their rows permuted for its RoPE layout, so their B matrices get the
same permutation. The spec, provenance and the base's file name and sha256 go in beside.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_annotator.hf.quant_grid import gguf_row_order
from edge_annotator.runtime.adapter_file import BASE_FILE, BASE_SHA256
from edge_annotator.runtime.gguf_file import read_strings, sha256_file
from edge_annotator.runtime.gguf_meta import FORMAT_VERSION, Keys

from . import mix
from .hf_to_gguf import Export, ExportError, check_merged, verify

TYPES = {"F32": np.float32, "F16": np.float16}


def _lora_weights(run: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """PEFT's adapter tensors (name -> array) and its config, from RUN/best-adapter."""
    from safetensors.numpy import load_file

    ad = run / "best-adapter"
    if not (ad / "adapter_model.safetensors").is_file():
        raise ExportError(f"{ad}: no adapter_model.safetensors; the adapter route needs the run folder the merged "
                          f"model came from (RUN/merged beside RUN/best-adapter)")
    conf = json.loads((ad / "adapter_config.json").read_text())
    if conf.get("modules_to_save"):
        raise ExportError(f"{ad}: modules trained in full ({conf['modules_to_save']}) cannot go in a LoRA adapter; "
                          f"export the merged model instead")
    return load_file(str(ad / "adapter_model.safetensors")), conf


def adapter_tensors(merged: Path, weights: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF name -> (A, B) of every adapted matrix, B in the base GGUF's row order."""
    tmap = mix.name_map(merged)
    conf = json.loads((merged / "config.json").read_text())
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        hf = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        name = mix.gguf_name(tmap, hf)
        if name is None:
            raise ExportError(f"{key}: no GGUF tensor name for {hf}")
        rows = gguf_row_order(conf, hf, b.shape[0])
        out[name] = (a, b if rows is None else b[rows])
    if not out:
        raise ExportError(f"{merged.parent / 'best-adapter'}: no LoRA matrices found")
    return out


def export_adapter(merged: str | Path, output: str | Path, base_gguf: str | Path, dtype: str = "F16") -> Export:
    """Write OUTPUT, a LoRA adapter GGUF for BASE_GGUF carrying the merged run's spec, and verify that
    llama.cpp applies it and tokenizes as the HF tokenizer does."""
    import gguf

    if dtype not in TYPES:
        raise ExportError(f"--adapter-type {dtype}: choose one of {', '.join(TYPES)}")
    job = Export(Path(merged), Path(output), f"adapter {dtype} on {Path(base_gguf).name}")
    spec = check_merged(job.merged)
    base = Path(base_gguf)
    if not base.is_file():
        raise ExportError(f"--adapter-on {base}: file not found")
    t0 = time.perf_counter()
    weights, conf = _lora_weights(job.merged.parent)
    pairs = adapter_tensors(job.merged, weights)
    arch = read_strings(base, {gguf.Keys.General.ARCHITECTURE}).get(gguf.Keys.General.ARCHITECTURE)
    if not arch:
        raise ExportError(f"--adapter-on {base}: the file names no {gguf.Keys.General.ARCHITECTURE}: not a base model")
    prov_file = job.merged / "provenance.json"
    prov = json.loads(prov_file.read_text()) if prov_file.exists() else {}
    base_sha = sha256_file(base)
    prov = {**{k: v for k, v in prov.items() if k != "val_report"},
            "export": {"route": "adapter", "adapter_type": dtype, "base_file": base.name, "base_sha256": base_sha,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    job.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.output.with_name(f".{job.output.name}.partial")
    w = gguf.GGUFWriter(tmp, arch=arch)
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(conf["lora_alpha"]))
        w.add_string(gguf.Keys.General.NAME, f"{spec.name} annotator (LoRA on {base.name})")
        w.add_uint32(Keys.FORMAT, FORMAT_VERSION)
        w.add_string(Keys.SPEC, spec.to_json())
        w.add_string(Keys.SPEC_SHA256, spec.sha256)
        w.add_string(Keys.PROVENANCE, json.dumps(prov, sort_keys=True, default=str))
        w.add_string(BASE_FILE, base.name)
        w.add_string(BASE_SHA256, base_sha)
        for name, (a, b) in sorted(pairs.items()):
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a.astype(TYPES[dtype])))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b.astype(TYPES[dtype])))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        job.info["verify"] = verify(tmp, job.merged, spec, base=base)  # the base is not beside tmp yet
        os.replace(tmp, job.output)
    finally:
        tmp.unlink(missing_ok=True)
    n_adapter = sum(a.size + b.size for a, b in pairs.values())
    size = job.output.stat().st_size
    job.info.update({"file": str(job.output), "sha256": sha256_file(job.output), "size_bytes": size,
                     "quant": job.quant, "route": "adapter", "base_file": str(base), "base_sha256": base_sha,
                     "base_size_bytes": base.stat().st_size, "adapter_matrices": len(pairs),
                     "adapter_weights": n_adapter, "spec_sha256": spec.sha256,
                     "seconds": round(time.perf_counter() - t0, 1)})
    job.info.update(block_bits(base, job.output))
    manifest = job.output.with_name(job.output.name + ".manifest.json")
    manifest.write_text(json.dumps(job.info, indent=2))
    return job


def block_bits(base: Path, adapter: Path | None = None) -> dict[str, Any]:
    """Bits a weight of the blocks' matrices (`blk.*` tensors of two dimensions; gguf-py: bytes x 8
    over elements) in BASE, their types, and the bits with ADAPTER's matrices counted in."""
    from edge_annotator.runtime.gguf_meta import block_matrices

    b = block_matrices(base)
    out: dict[str, Any] = {"block_bits_per_weight": b["bits_per_weight"], "block_types": b["types"],
                           "block_matrices": b["matrices"]}
    if adapter is not None:
        a = block_matrices(adapter)
        el = b["elements"]
        out["block_bits_per_weight_with_adapter"] = round(8 * (b["bytes"] + a["bytes"]) / el, 3) if el else 0.0
        out["adapter_types"] = a["types"]
    return out
