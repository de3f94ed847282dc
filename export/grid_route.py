"""The grid route: a run trained with `qat: true`, written into its base GGUF's own blocks.

    job = export_grid("RUN/merged", "annotator.gguf", "models/gemma-3-270m-q4_k_m.gguf")

Such a run's merged weights lie on the grid of the GGUF its base was dequantized from
(train/qat.py): every block matrix is the base file's, with the same scales, and only the codes
of the weights training moved differ. So the annotator is that file with those codes replaced
(hf/quant_grid.py), the spec and provenance embedded: one file, the base's tensor types and size
(llama.cpp's Q4_K_M: 5.43 bits a weight for Gemma 3 270M), nothing rounded after training. Each
merged matrix is checked to lie on the grid, weight by weight, before anything is written; a run
trained without qat is refused with the routes that fit it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_annotator.hf.quant_grid import LAYOUTS, gguf_row_order, read_grid
from edge_annotator.runtime.gguf_file import read_tensor_infos, sha256_file, tensor_data

from . import mix
from .hf_to_gguf import Export, ExportError, check_merged, verify
from .lora_gguf import block_bits
from .metadata import embed_spec

ON_GRID = 1e-3
"""How far from its grid point a merged weight may lie, in units of its block's step: the merged
weights are the grid's own floats (train/qat.py: bake), so any real distance means another grid."""


def grid_codes(merged: Path, base: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """{GGUF name: new bytes} of every block matrix whose codes the merged model changed, and what
    was found (matrices, weights, weights moved). ExportError naming the first matrix off the grid."""
    from safetensors import safe_open

    conf = json.loads((merged / "config.json").read_text())
    tmap = mix.name_map(merged)
    tensors = read_tensor_infos(base)
    replaced: dict[str, np.ndarray] = {}
    matrices = weights = moved = 0
    for f in sorted(merged.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for key in st.keys():
                name = mix.gguf_name(tmap, key)
                t = tensors.get(name or "")
                if t is None or not t.name.startswith("blk.") or t.qtype not in LAYOUTS:
                    continue
                w = st.get_tensor(key).astype(np.float32)
                g = read_grid(tensor_data(base, t), t.qtype)
                if w.shape != g.codes.shape:
                    raise ExportError(f"{merged}: {key} is {w.shape}, {base.name}'s {t.name} {g.codes.shape}")
                rows = gguf_row_order(conf, key, w.shape[0])
                if rows is not None:
                    w = w[rows]
                q = g.encode(w)
                lay = g.layout
                off = np.abs(g.dequantize(q) - w).reshape(w.shape[0], -1, lay.sub) / np.maximum(g.scale[:, :, None],
                                                                                              1e-30)
                if off.max() > ON_GRID:
                    raise ExportError(
                        f"{merged}: {key} is not on the grid of {base.name}'s {t.name} ({int((off > ON_GRID).sum())} "
                        f"weights off it, up to {off.max():.2f} of a step): the grid route exports runs trained "
                        f"with qat: true on that base; export this run with --route adapter or --route merged")
                matrices += 1
                weights += q.size
                n = int((q != g.codes).sum())
                if n:
                    moved += n
                    replaced[t.name] = g.with_codes(q)
    if not matrices:
        raise ExportError(f"{merged}: no block matrix of {base.name} found in it")
    return replaced, {"matrices": matrices, "weights": weights, "weights_moved": moved,
                      "matrices_changed": len(replaced)}


def export_grid(merged: str | Path, output: str | Path, base_gguf: str | Path) -> Export:
    """Write OUTPUT: BASE_GGUF with the merged run's codes in its blocks and the spec embedded;
    verified to load and tokenize as the HF tokenizer does, then renamed into place."""
    job = Export(Path(merged), Path(output), "Q4_K_M")
    spec = check_merged(job.merged)
    base = Path(base_gguf)
    if not base.is_file():
        raise ExportError(f"{base}: base GGUF not found")
    t0 = time.perf_counter()
    replaced, found = grid_codes(job.merged, base)
    prov_file = job.merged / "provenance.json"
    prov = json.loads(prov_file.read_text()) if prov_file.exists() else {}
    base_sha = sha256_file(base)
    prov = {**{k: v for k, v in prov.items() if k != "val_report"},
            "export": {"route": "grid", "base_file": base.name, "base_sha256": base_sha, **found,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    job.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.output.with_name(f".{job.output.name}.grid.partial")
    try:
        embed_spec(base, tmp, spec, prov, tensors=replaced)
        job.info["verify"] = verify(tmp, job.merged, spec)
        tmp.replace(job.output)
    finally:
        tmp.unlink(missing_ok=True)
    size = job.output.stat().st_size
    job.info.update({"file": str(job.output), "sha256": sha256_file(job.output), "size_bytes": size,
                     "quant": job.quant, "route": "grid", "base_file": str(base), "base_sha256": base_sha,
                     "spec_sha256": spec.sha256, **found, "seconds": round(time.perf_counter() - t0, 1)})
    job.info.update(block_bits(job.output))
    n_weights = sum(mix.hf_weight_sizes(job.merged).values())
    job.info["bits_per_weight"] = round(8 * size / max(1, n_weights), 3)
    return job
