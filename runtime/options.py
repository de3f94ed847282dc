"""click options that several commands share (annotate, parity, bench): one definition each.

A module of its own, not runtime/cli.py: the stages' command modules import these while
runtime/cli.py is loading them as plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


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


def gpu_layers_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The one --gpu-layers of annotate, parity and bench."""
    return click.option("--gpu-layers", type=GpuLayers(), default="0", show_default=True, metavar="N|all",
                        envvar="ANNOTATE_GPU_LAYERS",
                        show_envvar=True,
                        help="Layers to run on the GPU, N or all; needs a GPU build of llama-cpp-python "
                             "(make install-cuda). 0: the CPU only. What holds across settings: "
                             "docs/install.md, GPUs.")(f)
