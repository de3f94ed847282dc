"""Which file a `--quant Q4_K_M` annotator is: the route export takes by default.

    job = export_annotator("RUN/merged", "annotator.gguf")     # route "auto"

- **adapter** (the default where it applies): the run's base was made from a GGUF
  (`annotate-cli base` / `from-gguf`: the base folder names it in edge_annotator_tokenizer.json) and
  that file is found beside the base folder (or given as `base_gguf`). The annotator is then the
  untouched base GGUF + the run's LoRA as llama.cpp's adapter file (export/lora_gguf.py): the blocks
  keep llama.cpp's own Q4_K_M types, and base + adapter is the trained model, as the base was
  dequantized from that very file. The base is placed beside the adapter (a hard link where the
  file system allows, else a copy), where `annotate` looks for it.
- **grid** (the default for runs trained with `qat: true`, at Q4_K_M): the run's weights were
  trained on the base GGUF's own grid (train/qat.py), so the annotator is that file with the
  trained codes written into its blocks (export/grid_route.py): one file, the base's types and size.
- **merged**: one file, the merged model quantized by llama.cpp, the LoRA-adapted tensors kept at
  `adapted_type` (export/hf_to_gguf.py). Used for other --quant types, for bases that did not come from
  a GGUF (an HF folder brought as it is), and when asked for.

docs/export.md has the measurements behind the choice (`make quant-routes`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from edge_annotator.hf.quant_grid import gguf_of

from .hf_to_gguf import Export, ExportError
from .hf_to_gguf import export as export_merged

ROUTES = ("auto", "adapter", "grid", "merged")
ADAPTER_QUANTS = ("Q4_K_M",)
"""--quant types the adapter and grid routes stand for: the registry's base files are llama.cpp's Q4_K_M."""


def trained_on_grid(merged: Path) -> bool:
    """Whether the run was trained with qat (its provenance's config says so)."""
    prov_f = merged / "provenance.json"
    return prov_f.is_file() and bool(json.loads(prov_f.read_text()).get("config", {}).get("qat"))


def base_gguf_of(merged: Path) -> Path | None:
    """The GGUF the run's base folder was dequantized from, where it can be found: the base folder
    (provenance `base_model`) names it; it is looked for beside that folder."""
    prov_f = merged / "provenance.json"
    if not prov_f.exists():
        return None
    base_model = json.loads(prov_f.read_text()).get("base_model")
    return gguf_of(base_model) if base_model else None


def place_base(base: Path, output: Path) -> Path:
    """BASE beside OUTPUT under its own name (hard link, else copy, written atomically); the path."""
    dst = output.parent / base.name
    if dst.exists():
        if dst.resolve() == base.resolve() or os.path.samefile(dst, base):
            return dst
        if dst.stat().st_size == base.stat().st_size:
            from edge_annotator.runtime.gguf_file import sha256_file

            if sha256_file(dst) == sha256_file(base):
                return dst
        raise ExportError(f"{dst} exists and is not {base}: the adapter's base must sit beside it under its "
                          f"own name; move {dst} away or write the annotator to another folder")
    tmp = dst.with_name(f".{dst.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(base, tmp)
    except OSError:
        shutil.copyfile(base, tmp)
    os.replace(tmp, dst)
    return dst


def choose(merged: Path, quant: str, route: str, base_gguf: Path | None) -> tuple[str, Path | None]:
    """The route to take and, for the adapter and grid routes, the base GGUF; ExportError where
    asked for one that cannot be taken."""
    if route not in ROUTES:
        raise ExportError(f"--route {route}: choose one of {', '.join(ROUTES)}")
    if route == "merged":
        return "merged", None
    base = base_gguf or base_gguf_of(merged)
    if route == "adapter":
        if base is None:
            raise ExportError(f"--route adapter: the GGUF {merged}'s base was made from is not found beside its "
                              "base folder; give it with --adapter-on BASE.gguf")
        return "adapter", base
    if route == "grid":
        if base is None:
            raise ExportError(f"--route grid: the GGUF {merged}'s base was made from is not found beside its "
                              "base folder; give it with --adapter-on BASE.gguf")
        return "grid", base
    if quant in ADAPTER_QUANTS and base is not None and trained_on_grid(merged):
        return "grid", base
    if quant in ADAPTER_QUANTS and base is not None and (merged.parent / "best-adapter").is_dir():
        return "adapter", base
    return "merged", None


def export_annotator(merged: str | Path, output: str | Path, quant: str = "Q4_K_M", threads: int | None = None,
                     adapted_type: str = "Q8_0", imatrix: str | Path | None = None, imatrix_items: int = 32,
                     route: str = "auto", base_gguf: str | Path | None = None, adapter_type: str = "F16") -> Export:
    """Export MERGED by ROUTE (see the module's docstring); job.info["route"] says which was taken."""
    from .grid_route import export_grid
    from .lora_gguf import export_adapter

    merged, output = Path(merged), Path(output)
    taken, base = choose(merged, quant, route, Path(base_gguf) if base_gguf else None)
    if taken == "adapter":
        assert base is not None
        output.parent.mkdir(parents=True, exist_ok=True)
        beside = place_base(base, output)
        job = export_adapter(merged, output, beside, adapter_type)
        info: dict[str, Any] = job.info
        info["base_file"] = str(beside)
    elif taken == "grid":
        assert base is not None
        job = export_grid(merged, output, base)
        info = job.info
    else:
        job = export_merged(merged, output, quant, threads, adapted_type, imatrix, imatrix_items)
        info = job.info
    info["route"] = taken
    man = output.with_name(output.name + ".manifest.json")
    man.write_text(json.dumps(info, indent=2))
    return job
