"""Embed a task spec and provenance into a GGUF file, so that one file is the whole annotator.

    annotate-cli embed-spec base.gguf tasks/emobank.yaml annotator.gguf

The tensors and llama.cpp's own keys are copied byte for byte (the file's layout read by
runtime/gguf_file.py, stepping over the vocabulary instead of decoding it as gguf-py's reader does:
seconds, not minutes, for Gemma 3's); our keys (runtime/gguf_meta.py: Keys) are set anew, after
the others. The output is written to a temporary name beside the target and renamed into place
only when complete, so an interrupted run leaves no half-written .gguf.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import click
import gguf
import numpy as np

from edge_annotator.runtime.errors import OutputError
from edge_annotator.runtime.gguf_file import read_layout
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
    lay = read_layout(src)
    tensors = tensors or {}
    for name, data in tensors.items():
        info = lay.tensors.get(name)
        shape, dtype = info.data_shape if info else ((), None)
        if info is None or data.shape != shape or data.dtype != dtype:
            raise ValueError(f"{src}: no tensor {name} of shape {data.shape} and type {data.dtype} to replace")
    ours = {Keys.FORMAT: _uint32(FORMAT_VERSION), Keys.SPEC: _string(spec.to_json()),
            Keys.SPEC_SHA256: _string(spec.sha256),
            Keys.PROVENANCE: _string(json.dumps(provenance or {}, sort_keys=True))}
    ours |= {k: _string(v) for k, v in (extra or {}).items()}
    kept = [(a, b) for key, a, b in lay.kv if key not in ours and not key.startswith(PREFIX + ".")]
    replaced = sorted((lay.tensors[name].offset, data) for name, data in tensors.items())
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        with open(src, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm, open(tmp, "wb") as out:
            out.write(b"GGUF" + struct.pack("<IQQ", lay.version, len(lay.tensors), len(kept) + len(ours)))
            for a, b in kept:
                out.write(mm[a:b])
            for key, value in ours.items():
                out.write(_key(key) + value)
            out.write(mm[lay.infos[0]:lay.infos[1]])  # the offsets in it count from the data's start
            out.write(b"\0" * (-out.tell() % lay.alignment))
            p = lay.data_start
            for offset, data in replaced:
                _copy(mm, p, offset, out)
                out.write(np.ascontiguousarray(data).tobytes())
                p = offset + data.nbytes
            _copy(mm, p, len(mm), out)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _key(key: str) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<IQ", gguf.GGUFValueType.STRING, len(raw)) + raw


def _uint32(value: int) -> bytes:
    return struct.pack("<II", gguf.GGUFValueType.UINT32, value)


def _copy(mm: mmap.mmap, start: int, end: int, out: Any, chunk: int = 1 << 24) -> None:
    for a in range(start, end, chunk):
        out.write(mm[a:min(a + chunk, end)])


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
