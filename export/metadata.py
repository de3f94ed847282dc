"""Embed a task spec and provenance into a GGUF file, so that one file is the whole annotator.

    annotate-cli embed-spec base.gguf tasks/emobank.yaml annotator.gguf

The tensors and llama.cpp's own keys are copied unchanged (gguf-py's reader and writer, the way
its gguf_new_metadata script does it); our keys (runtime/gguf_meta.py: Keys) are set anew. The
output is written to a temporary name beside the target and renamed into place only when
complete, so an interrupted run leaves no half-written .gguf.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click
import gguf
import numpy as np

from edge_annotator.runtime.errors import OutputError
from edge_annotator.runtime.gguf_meta import FORMAT_VERSION, PREFIX, Keys
from edge_annotator.runtime.options import Command
from edge_annotator.runtime.spec import TaskSpec, load_spec

log = logging.getLogger(__name__)


def embed_spec(src: str | Path, dst: str | Path, spec: TaskSpec, provenance: dict[str, Any] | None = None,
               extra: dict[str, str] | None = None, tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Copy GGUF `src` to `dst` with the spec and provenance under the edge_annotator.* keys.

    `extra` string keys (e.g. tokenizer.chat_template) are set too, replacing any of the same name.
    `tensors` replaces the stored bytes of the tensors it names, each the same shape and type as the
    one it replaces (export/grid_route.py: the trained codes in the base's blocks)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise OutputError(f"{dst}: write to a new file, not over the source")
    reader = gguf.GGUFReader(src, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tensors = tensors or {}
    stored = {t.name: t.data for t in reader.tensors}
    for name, data in tensors.items():
        if name not in stored or data.shape != stored[name].shape or data.dtype != stored[name].dtype:
            raise ValueError(f"{src}: no tensor {name} of shape {data.shape} and type {data.dtype} to replace")
    tmp = dst.with_name(f".{dst.name}.partial")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    try:
        for field in reader.fields.values():
            # GGUF.* are virtual; the writer adds the architecture itself; our own keys are replaced
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", PREFIX + ".")):
                continue
            if extra and field.name in extra:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_uint32(Keys.FORMAT, FORMAT_VERSION)
        writer.add_string(Keys.SPEC, spec.to_json())
        writer.add_string(Keys.SPEC_SHA256, spec.sha256)
        writer.add_string(Keys.PROVENANCE, json.dumps(provenance or {}, sort_keys=True))
        for k, v in (extra or {}).items():
            writer.add_string(k, v)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(tensors.get(t.name, t.data), tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return dst


@click.command("embed-spec", cls=Command)
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
def embed_spec_command(src: Path, spec: Path, dst: Path) -> None:
    """Copy GGUF SRC to DST with task SPEC embedded: a zero-shot annotator in one file, no training.

    \b
    Examples:
      annotate-cli embed-spec models/gemma-3-270m-q4_k_m.gguf tasks/emobank.yaml emobank-zero-shot.gguf
      annotate-cli annotate emobank-zero-shot.gguf data/emobank-test-50.jsonl     # no --spec needed
    """
    provenance = {"base_model": src.name, "note": "zero-shot: spec embedded, no fine-tuning"}
    click.echo(embed_spec(src, dst, load_spec(spec), provenance))


if __name__ == "__main__":
    embed_spec_command()
