"""What annotate-cli's commands share: the one error boundary, and click options several take.

A module of its own, not runtime/cli.py: the stages' command modules import these while
runtime/cli.py is loading them from runtime/commands.py's table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from .errors import UserError


@contextlib.contextmanager
def one_line() -> Iterator[None]:
    """The one error boundary: what a user can cause (runtime/errors.py's UserError family, which
    every stage's errors join) and what the machine refuses (an OSError: no permission, a full
    disk, a file gone) end as one line and exit 1; anything else is a bug and keeps its traceback."""
    try:
        yield
    except UserError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{e.filename}: {e.strerror or e}" if e.filename else str(e)) from None


class Command(click.Command):
    """A command that keeps the boundary when it runs on its own, outside annotate-cli's group
    (scripts and tests invoke the stages' commands directly): every command declares cls=Command."""

    def invoke(self, ctx: click.Context) -> Any:
        with one_line():
            return super().invoke(ctx)


class GpuLayers(click.ParamType):
    """--gpu-layers: a count of layers, or "all" (every layer and the output layer: GPU_ALL)."""

    name = "N|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "all":
            from .engine import GPU_ALL

            return GPU_ALL
        if text.isdigit():
            return int(text)
        self.fail(f"{value!r} is neither a count of layers (0, 1, 2, ...) nor 'all'", param, ctx)


def base_model_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--base-model: the base GGUF of an adapter annotator (annotate-cli export --adapter-on), where it
    is not beside the adapter; the one place ANNOTATE_BASE_MODEL is read."""
    return click.option("--base-model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                        envvar="ANNOTATE_BASE_MODEL", show_envvar=True,
                        help="An adapter annotator's base GGUF, where it is not beside the adapter (checked by "
                             "sha256) [default: the file the adapter names, beside it].")(f)


def gpu_layers_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The one --gpu-layers of annotate, parity and bench."""
    return click.option("--gpu-layers", type=GpuLayers(), default="0", show_default=True, metavar="N|all",
                        envvar="ANNOTATE_GPU_LAYERS",
                        show_envvar=True,
                        help="Layers to run on the GPU, N or all; needs a GPU build of llama-cpp-python "
                             "(make install-cuda). 0: the CPU only. What holds across settings: "
                             "docs/install.md, GPUs.")(f)
