"""Files that ship inside the package (pyproject: edge_annotator.tasks, edge_annotator.data): the
task specs and the smallest EmoBank sample, found the same way in a checkout, an editable install
and an installed wheel."""

from __future__ import annotations

import importlib
from pathlib import Path


def shipped_dir(package: str) -> Path:
    """The folder of `edge_annotator.<package>` ("tasks" or "data")."""
    mod = importlib.import_module(f"edge_annotator.{package}")
    # a namespace package's path; an editable install adds a hook entry that is not a folder
    for d in mod.__path__:
        if Path(d).is_dir():
            return Path(d)
    raise FileNotFoundError(f"edge_annotator.{package} has no folder (a broken install? reinstall the package)")


def shipped(package: str, name: str) -> Path:
    p = shipped_dir(package) / name
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not shipped with this install of edge-annotator")
    return p
