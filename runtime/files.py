"""Outputs written beside their final place and swapped in, so nothing is ever half-written (the
trainer's checkpoints and adapters, merged models, HF folders made from a GGUF, every file a
command writes whole), and the checks that an output replaces nothing it should not."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import OutputError


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


def atomic_write(final: Path, data: str | bytes) -> Path:
    """Write DATA to a temporary file in FINAL's folder, then rename it into place: a reader (or a
    command killed half way) sees the old file or the new, never part of one."""
    import os

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def atomic_copy(src: Path, final: Path) -> Path:
    """SRC copied to FINAL as atomic_write writes: the old file or the new, never part of one."""
    import os

    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (a link or another spelling of it included)."""
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def refuse_inputs(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """OutputError where OUT is one of the command's INPUTS: a command never writes over what it reads."""
    for i in inputs:
        if i is not None and "://" not in str(i) and (same_file(out, Path(i)) or out.resolve() == Path(i).resolve()):
            raise OutputError(f"{out}: this is also an input of the command ({i}); write the output to another file")


def check_output(out: Path, inputs: Iterable[str | Path | None] = (), force: bool = False) -> Path:
    """OUT, once it is clear that writing it loses nothing: never one of INPUTS, never a folder,
    and (unless FORCE) not an existing file. The command then writes it with atomic_write."""
    refuse_inputs(out, inputs)
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name")
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to replace it, or give another file")
    return out
