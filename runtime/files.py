"""Folders written beside their final place and swapped in, so nothing is ever half-written:
the trainer's checkpoints and adapters, merged models, HF folders made from a GGUF."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Fill a folder beside `final` with write(), then swap it into place: never half-written."""
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_write(final: Path, text: str) -> Path:
    """Write text beside `final`, then rename it into place: a reader sees the old file or the new."""
    import os

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, final)
    return final


def write_section(path: Path, name: str, text: str, title: str = "# Benchmarks") -> None:
    """Put `text` between `<!-- begin NAME -->` and `<!-- end NAME -->` in a Markdown file, keeping
    the rest: `make bench`, `make bench-train`, `make eval` and `make learning-curve` each rewrite
    only their own section of a page."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    old = path.read_text() if path.exists() else title + "\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)
