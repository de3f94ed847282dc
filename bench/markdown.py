"""The measurement pages' sections: every make target that measures (bench, bench-train, eval,
learning-curve, active-learning, quant-routes, the head route) rewrites only its own section of a
page in docs/, between `<!-- begin NAME -->` and `<!-- end NAME -->`, and leaves the prose around
it alone. Research tooling: nothing in the runtime, train or export stages imports it."""

from __future__ import annotations

from pathlib import Path

from edge_annotator.runtime.files import atomic_write


def write_section(path: Path, name: str, text: str, title: str = "# Benchmarks") -> None:
    """Put TEXT between `<!-- begin NAME -->` and `<!-- end NAME -->` in the Markdown file PATH,
    keeping the rest (a page without the markers gets the section appended; a missing page starts
    with TITLE). The page is replaced whole, never left half-written."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    old = path.read_text() if path.exists() else title + "\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    atomic_write(path, new)
