"""Every annotate-cli command in one table: its name, the click command it runs, the extra it needs.

runtime/cli.py builds annotate-cli from COMMANDS and nothing else. A command is named by
"module:attribute" and imported only when the group is built, so the runtime package never imports a
stage (train/, export/, bench/) in its code, and a command whose extra is not installed is never
imported at all: it is listed as "(not installed: pip install 'edge-annotator[EXTRA]')" and, run,
says so in one line. The extras themselves are pyproject.toml's [project.optional-dependencies];
tests/test_packaging.py checks that every extra named here is one of them.

To add a command: write it as a click command with cls=runtime.options.Command (the one error
boundary), then add its row here.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

import click

CLI_MODULE = "edge_annotator.runtime.cli"


@dataclass(frozen=True)
class Entry:
    name: str
    target: str
    """"module:attribute" of the click command."""
    extra: str | None = None
    """The extra of edge-annotator the command needs; None: the runtime's own dependencies suffice."""


COMMANDS: tuple[Entry, ...] = (
    # the runtime: llama.cpp, numpy and the record formats
    Entry("annotate", f"{CLI_MODULE}:annotate"),
    Entry("agree", f"{CLI_MODULE}:agree"),
    Entry("convert", f"{CLI_MODULE}:convert"),
    Entry("select", f"{CLI_MODULE}:select_cmd"),
    Entry("inspect", f"{CLI_MODULE}:inspect"),
    Entry("data", f"{CLI_MODULE}:data"),
    Entry("doctor", f"{CLI_MODULE}:doctor"),
    Entry("embed-spec", "edge_annotator.export.metadata:embed_spec_command"),
    Entry("head", "edge_annotator.export.heads:head_command"),
    Entry("trust", "edge_annotator.export.trust_rule:trust_command"),
    Entry("serve", "edge_annotator.runtime.serve:serve", "serve"),
    # training and export: torch and transformers
    Entry("base", "edge_annotator.train.from_gguf:base", "train"),
    Entry("fit", "edge_annotator.train.cli:fit", "train"),
    Entry("train", "edge_annotator.train.cli:train", "train"),
    Entry("from-gguf", "edge_annotator.train.from_gguf:from_gguf", "export"),
    Entry("export", "edge_annotator.export.cli:export", "export"),
    Entry("parity", "edge_annotator.export.cli:parity", "export"),
    Entry("bench", "edge_annotator.bench.cli:bench", "export"),
)


def load(entry: Entry, modules: dict[str, Any] | None = None) -> click.Command:
    """ENTRY's command, or a stand-in that says what to install: where its extra is missing (nothing
    of it imported), or where importing it fails (a broken install). MODULES: modules already loaded
    by name (runtime/cli.py passes itself, which may be running as __main__)."""
    if entry.extra and (lacking := missing(entry.extra)):
        return not_installed(entry.name, entry.extra, f"{lacking[0]} is missing")
    module_name, _, attribute = entry.target.partition(":")
    try:
        module = (modules or {}).get(module_name) or importlib.import_module(module_name)
    except ImportError as e:
        return not_installed(entry.name, entry.extra or "", str(e))
    command = getattr(module, attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{entry.target} is not a click command")  # a bug in the table, not the install
    return command


@functools.cache
def missing(extra: str) -> list[str]:
    """The requirements of EXTRA (pyproject's optional dependencies) whose distribution is not
    installed, looked up once per extra; [] when edge-annotator itself is not installed (a checkout
    run in place: nothing to check against)."""
    from importlib.metadata import PackageNotFoundError, distribution, requires

    from packaging.requirements import Requirement

    try:
        declared = requires("edge-annotator") or []
    except PackageNotFoundError:
        return []
    out = []
    for line in declared:
        req = Requirement(line)
        # a requirement of EXTRA: its marker holds with extra == EXTRA and not without it
        if req.marker is None or not req.marker.evaluate({"extra": extra}) or req.marker.evaluate({"extra": ""}):
            continue
        try:
            distribution(req.name)
        except PackageNotFoundError:
            out.append(str(req).split(";")[0].strip())
    return out


def not_installed(name: str, extra: str, why: str) -> click.Command:
    """A stand-in for a command that cannot run here: listed as not installed, and run, one line and
    exit 1, whatever its arguments."""
    hint = f"pip install 'edge-annotator[{extra}]'" if extra else "reinstall edge-annotator"

    def run(**_: Any) -> None:
        raise click.ClickException(f"annotate-cli {name} is not installed here ({why}): {hint}")

    return click.Command(name, callback=run, help=f"(not installed: {hint})", short_help=f"(not installed: {hint})",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                         add_help_option=False)
