"""Bad input never loses a file, crashes a command or reaches past its folder.

Each case is a command a user (or a file from anyone) can give. Each must end in exit 1 (2 for a
usage mistake) and one line naming the file (and line and field where there is one), with no
traceback, and leave every file of its folder as it was: the folder is hashed before and after.
The reader fuzzing is in test_fuzz.py; serve's security cases, against a real server, are in
test_serve.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import TASKS

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.spec import load_spec

SPEC = TASKS / "emobank.yaml"
S = load_spec(SPEC)
CRITERIA = S.criterion_names


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pred(item_id: str, label: Any = 3, probs: Any = None, **over: Any) -> dict[str, Any]:
    probs = probs if probs is not None else {str(v): 0.2 for v in range(1, 6)}
    rec = {"id": item_id, "labels": {c: label for c in CRITERIA}, "scores": {c: 3.0 for c in CRITERIA},
           "probs": {c: probs for c in CRITERIA}, "model_sha256": "ab" * 32, "spec_sha256": S.sha256}
    return rec | over


def _jsonl(path: Path, *records: Any) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _refused(folder: Path, args: list[str], needle: str, code: int = 1) -> str:
    """Run the CLI in FOLDER's terms; it must exit CODE with one line holding NEEDLE, and change no file."""
    before = _snapshot(folder)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == code, (args, r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), f"{args}: {type(r.exception).__name__}: {r.exception}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("annotating ")]  # its bar
    assert len(lines) == 1 or code == 2 or "invalid task spec" in r.stderr, (args, r.stderr)
    assert "Traceback" not in r.output and needle in r.stderr, (args, needle, r.stderr)
    assert _snapshot(folder) == before, f"{args} changed a file"
    return r.stderr


@pytest.fixture
def work(tmp_path: Path) -> Path:
    _jsonl(tmp_path / "items.jsonl", {"id": "s1", "text": "We won the cup!"}, {"id": "s2", "text": "It rained."})
    _jsonl(tmp_path / "pred.jsonl", _pred("s1"), _pred("s2", 4))
    _jsonl(tmp_path / "humans.jsonl", {"id": "s1", "text": "We won the cup!", "rater": "a", "labels": {"Valence": 4}},
           {"id": "s1", "text": "We won the cup!", "rater": "b", "labels": {"Valence": 5}},
           {"id": "s2", "text": "It rained.", "rater": "a", "labels": {"Valence": 2}})
    (tmp_path / "ratings.csv").write_text("id,text,Valence\ns1,We won the cup!,4\n")
    return tmp_path


# -- outputs: nothing a command did not create is replaced ---------------------------------------

def test_no_command_writes_over_its_input_or_an_existing_file(work: Path) -> None:
    p, s = str(work / "pred.jsonl"), str(SPEC)
    _refused(work, ["convert", p, "--to", "csv", "--spec", s, "-o", p], "also an input")
    _refused(work, ["convert", p, "--to", "csv", "--spec", s, "-o", str(work / "ratings.csv")], "pass --force")
    _refused(work, ["convert", p, "--to", "label-studio", "--spec", s, "-o", str(work / "t.json"),
                    "--label-config", str(work / "t.json")], "two outputs")
    _refused(work, ["convert", p, "--to", "csv", "--spec", s, "-o", str(work / "x.csv"),
                    "--items", str(work / "x.csv")], "", code=2)  # --items must exist: click says so
    _refused(work, ["select", p, "-n", "1", "--spec", s, "-o", p, "--force"], "also an input")
    _refused(work, ["data", "reshape", str(work / "ratings.csv"), "--spec", s, "-o", str(work / "ratings.csv"),
                    "--force"], "also an input")
    export = _jsonl(work / "export.json", "[]")
    _refused(work, ["data", "import", str(export), "--from", "label-studio", "--spec", s, "-o", str(export)],
             "also an input")
    split = work / "split"
    split.mkdir()
    (split / "train.jsonl").write_text((work / "humans.jsonl").read_text())
    _refused(work, ["data", "split", str(split / "train.jsonl"), "--spec", s, "-o", str(split), "--force"],
             "also an input")
    _refused(work, ["data", "split", str(work / "humans.jsonl"), "--spec", s, "-o", str(split)], "pass --force")
    # fit: never over its inputs, nor over a file no run of it wrote (it has no --force)
    (work / "base").mkdir()
    (work / "base" / "config.json").write_text("{}")
    fit = ["fit", s, str(work / "humans.jsonl"), "--base", str(work / "base"), "-o"]
    _refused(work, [*fit, str(work / "humans.jsonl")], "also an input")
    _refused(work, [*fit, str(work / "pred.jsonl")], "fit never replaces a file it did not write")
    _refused(work, [*fit, str(work / "pred.jsonl"), "--resume"], "fit never replaces a file it did not write")
    # --force replaces an output (whole, through a file renamed into place), never an input
    r = CliRunner().invoke(cli, ["convert", p, "--to", "csv", "--spec", s, "-o", str(work / "ratings.csv"), "--force"])
    assert r.exit_code == 0, r.output
    assert (work / "ratings.csv").read_text().startswith("id,Valence_label")
    assert not list(work.glob(".*.partial"))


def test_a_label_studio_export_of_any_shape_is_one_line(work: Path) -> None:
    task = {"id": 1, "data": {"id": "s1", "text": "We won the cup!"}}
    ok = {"completed_by": 3, "result": [{"from_name": "Valence", "type": "rating", "value": {"rating": 4}}]}
    cases: list[tuple[bytes, str]] = [
        (json.dumps([{**task, "annotations": [1]}]).encode(), "[0].annotations[0]"),
        (json.dumps([{**task, "annotations": [{"result": [1]}]}]).encode(), "[0].annotations[0].result[0]"),
        (json.dumps([{**task, "annotations": [{"result": [{"from_name": "Valence", "value": "x"}]}]}]).encode(),
         "[0].annotations[0].result[0].value"),
        (json.dumps([{**task, "annotations": "all"}]).encode(), "[0].annotations"),
        (json.dumps([{**task, "data": {"id": "s1", "text": ["not", "text"]}, "annotations": [ok]}]).encode(),
         "must be text"),
        (json.dumps([{**task, "data": {"id": "s1", "text": "a NUL \x00"}, "annotations": [ok]}]).encode(), "NUL"),
        (json.dumps([{**task, "data": {"id": [1], "text": "x"}}]).encode(), "not an item id"),
        (b'[{"id": 1, "data": {"id": "s1", "text": "caf\xe9"}}]', "not valid UTF-8"),
        (b'[{"id": 1, "data": {"id": ' + b"9" * 5000 + b', "text": "x"}}]', "5,000 digits"),
        (b"[" * 200_000, "nested more than"),
        (b'[{"id": NaN}]', "NaN"),
        (b"{}", "not a Label Studio JSON export"),
    ]
    for i, (raw, needle) in enumerate(cases):
        f = work / f"export-{i}.json"
        f.write_bytes(raw)
        _refused(work, ["data", "import", str(f), "--from", "label-studio", "--spec", str(SPEC), "-o",
                        str(work / f"labels-{i}.jsonl")], needle)
    # a byte order mark is read as the JSONL and CSV readers read it; a rater nobody named stays unnamed
    f = work / "bom.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps([{**task, "annotations": [{**ok, "completed_by": None}]}]).encode())
    r = CliRunner().invoke(cli, ["data", "import", str(f), "--from", "label-studio", "--spec", str(SPEC), "-o",
                                 str(work / "back.jsonl")])
    assert r.exit_code == 0, r.output
    assert json.loads((work / "back.jsonl").read_text()) == {"id": "s1", "text": "We won the cup!",
                                                             "labels": {"Valence": 4}}


def test_predictions_outside_the_spec_are_named(work: Path) -> None:
    s = str(SPEC)
    cases = [
        (_pred("s1", "high"), "field 'labels.Valence': 'high' is not a number"),
        (_pred("s1", 7), "field 'labels.Valence': 7 is outside the scale 1..5"),
        (_pred("s1", probs={"1": "x"}), "field 'probs.Valence': level 1: 'x' is not a probability"),
        (_pred("s1", probs={"9": 0.5}), "field 'probs.Valence': '9' is not a level"),
        ('{"id": "s1", "labels": {}, "probs": {"Valence": {"1": NaN}}}', "NaN is not a JSON number"),
        (_pred("s1", scores={"Valence": "high"}), "field 'scores'"),
    ]
    for i, (rec, needle) in enumerate(cases):
        f = _jsonl(work / f"bad-{i}.jsonl", _pred("s0"), rec)
        _refused(work, ["agree", str(f), str(work / "humans.jsonl"), "--spec", s], f"bad-{i}.jsonl:2:")
        _refused(work, ["convert", str(f), "--to", "label-studio", "--spec", s, "-o", str(work / f"t{i}.json")],
                 needle)
        _refused(work, ["select", str(f), "-n", "1", "--spec", s], needle)
    dup = _jsonl(work / "dup.jsonl", _pred("s1"), _pred("s2"), _pred("s1"))
    _refused(work, ["select", str(dup), "-n", "2", "--spec", s], "dup.jsonl:3: field 'id': a second result for item "
                                                                 "'s1' (the first is at line 1)")


def test_json_past_the_readers_bounds_is_one_line_in_every_reader(work: Path) -> None:
    big = '{"id": "s9", "text": ' + "1" * 4301 + "}"
    deep = '{"id": "s9", "text": ' + "[" * 200_000 + "]" * 200_000 + "}"
    for i, (line, needle) in enumerate([(big, "an integer of 4,301 digits"), (deep, "nested more than 64 deep")]):
        f = _jsonl(work / f"odd-{i}.jsonl", {"id": "s1", "text": "Fine.", "labels": {"Valence": 3}}, line)
        _refused(work, ["agree", str(work / "pred.jsonl"), str(f), "--spec", str(SPEC)], f"odd-{i}.jsonl:2: {needle}")
        _refused(work, ["data", "check", str(f), "--spec", str(SPEC)], f"odd-{i}.jsonl:2: {needle}")


def test_specs_that_would_format_or_hide_the_scale_are_refused(work: Path) -> None:
    text = SPEC.read_text()
    first = next(t for t in S.templates)
    for i, (template, needle) in enumerate([("{rubric:>99999999999999999999} {inputs}", "no format spec"),
                                            ("{rubric!r}", "no format spec"),
                                            ("Rate the text.", "has no {rubric}")]):
        spec = work / f"spec-{i}.yaml"
        spec.write_text(text.replace(json.dumps(first)[1:-1], template) if json.dumps(first)[1:-1] in text
                        else text.replace("templates:", f"templates:\n  - {json.dumps(template)}", 1))
        _refused(work, ["data", "check", str(work / "humans.jsonl"), "--spec", str(spec)], needle)


def test_empty_files_say_so(work: Path) -> None:
    for name in ("empty.jsonl", "blank.jsonl", "header.csv"):
        f = work / name
        f.write_text({"empty.jsonl": "", "blank.jsonl": "\n  \n", "header.csv": "id,text\n"}[name])
        _refused(work, ["data", "check", str(f), "--spec", str(SPEC)], "holds no records")
        _refused(work, ["annotate", "no-model.gguf", str(f), "--spec", str(SPEC)], "holds no records")


def test_a_csv_field_past_pythons_default_limit_is_read(work: Path) -> None:
    long = "word " * 30_000  # 150,000 characters: over csv's default 131,072
    f = work / "long.csv"
    f.write_text(f"id,text,Valence\ns1,{long},4\ns2,short,3\n")
    r = CliRunner().invoke(cli, ["data", "check", str(f), "--spec", str(SPEC), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["items"] == 2, r.output


def test_an_adapters_base_file_is_only_ever_a_name_beside_it(tmp_path: Path) -> None:
    """An adapter GGUF whose base_file climbs out of its folder to a file whose sha256 it records:
    the runtime looks only for that name beside the adapter, never opens the file outside, and says
    so in one line that names only options that exist."""
    import gguf

    from edge_annotator.runtime.adapter_file import BASE_FILE, BASE_SHA256

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.gguf"
    secret.write_bytes(b"GGUF not really a model")
    models = tmp_path / "models"
    models.mkdir()
    adapter = models / "adapter.gguf"
    w = gguf.GGUFWriter(str(adapter), "gemma3")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_string(BASE_FILE, "../outside/secret.gguf")
    w.add_string(BASE_SHA256, hashlib.sha256(secret.read_bytes()).hexdigest())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    items = _jsonl(tmp_path / "items.jsonl", {"id": "s1", "text": "x"})
    code = textwrap.dedent(f"""
        import sys
        opened = []
        sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == "open" else None)
        from edge_annotator.runtime.cli import cli
        for argv in (["inspect", {str(adapter)!r}], ["annotate", {str(adapter)!r}, {str(items)!r}]):
            try:
                cli(argv, standalone_mode=False)
            except Exception as e:
                print(type(e).__name__, "|", e)
        assert {str(adapter)!r} in opened, "the audit hook sees what is opened"
        assert not [p for p in opened if "outside" in p], [p for p in opened if "outside" in p]
        print("CONFINED")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "CONFINED" in r.stdout, r.stdout + r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if "|" in ln]
    assert len(lines) == 2 and all(ln.startswith("ClickException | ") or ln.startswith("ModelError | ")
                                   for ln in lines), lines
    for ln in lines:
        assert f"secret.gguf (sha256 {hashlib.sha256(secret.read_bytes()).hexdigest()[:16]}...) is not at " \
               f"{models / 'secret.gguf'}" in ln and "--base-model PATH" in ln, ln
    for name in ("inspect", "annotate"):  # the option the message names is one both commands take
        assert "--base-model" in [o for p in cli.commands[name].params for o in p.opts], name


# -- annotate, with the real model ----------------------------------------------------------------

@pytest.mark.slow
def test_resume_continues_only_its_own_output(work: Path, gemma_path: Path) -> None:
    m, s = str(gemma_path), str(SPEC)
    x = work / "X.csv"
    x.write_text("id,text\nc1,We won the cup!\nc2,It rained all day.\n")
    _refused(work, ["annotate", m, str(x), "--spec", s, "-o", str(x), "--resume"], "also an input")
    _refused(work, ["annotate", m, str(x), "--spec", s, "-o", str(work / "ratings.csv"), "--resume"],
             "ratings.csv:1: --resume continues only annotate's own output")
    _refused(work, ["annotate", m, str(x), "--spec", s, "-o", str(work), "--resume"], "names a folder")
    # records of another spec (or model) are not this job's: refused before a byte changes
    other = _jsonl(work / "other.jsonl", _pred("c1", spec_sha256="0" * 64) | {"model_sha256": "1" * 64})
    _refused(work, ["annotate", m, str(x), "--spec", s, "-o", str(other), "--resume"],
             "records of another model or spec")
    # its own output, torn at the end, continues (tests/test_cli_annotate.py checks the bytes)
    out = work / "out.jsonl"
    r = CliRunner().invoke(cli, ["annotate", m, str(x), "--spec", s, "-o", str(out), "--threads", "2"])
    assert r.exit_code == 0, r.output
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.index(b"\n") + 9])  # the second record torn after 8 bytes
    r = CliRunner().invoke(cli, ["annotate", m, str(x), "--spec", s, "-o", str(out), "--resume", "--threads", "2"])
    assert r.exit_code == 0 and out.read_bytes() == whole, r.output
    # a torn line that no annotate record begins with is not a torn record
    out.write_bytes(whole[: whole.index(b"\n") + 1] + b"id,text")
    _refused(work, ["annotate", m, str(x), "--spec", s, "-o", str(out), "--resume"], "out.jsonl:2: --resume")


@pytest.mark.slow
def test_items_past_the_readers_bounds_become_error_records_or_one_line(work: Path, gemma_path: Path) -> None:
    f = _jsonl(work / "odd.jsonl", {"id": "s1", "text": "Fine."}, '{"id": "s2", "text": ' + "1" * 4301 + "}",
               '{"id": "s3", "text": ' + "[" * 200_000 + "]" * 200_000 + "}", {"id": "s4", "text": "Good."})
    _refused(work, ["annotate", str(gemma_path), str(f), "--spec", str(SPEC), "--threads", "2"],
             "odd.jsonl:2: an integer of 4,301 digits")
    r = CliRunner().invoke(cli, ["annotate", str(gemma_path), str(f), "--spec", str(SPEC), "--on-error", "skip",
                                 "--threads", "2"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [("error" in x, x.get("error", {}).get("line")) for x in recs] == [(False, None), (True, 2), (True, 3),
                                                                             (False, None)]


def test_messages_name_only_options_that_exist() -> None:
    """Every --option a message of the package names is an option of some annotate-cli command
    (or of the outside tool the message is about: pip, llama.cpp's converter)."""
    import re

    import click
    from conftest import ROOT

    outside = {"--force-reinstall", "--no-binary", "--no-cache-dir", "--no-deps", "--outfile", "--outtype",
               "--target", "--help"}
    options: set[str] = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            options.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(cli)
    named = {(m.group(0), f.name) for stage in ("runtime", "train", "export", "hf")
             for f in (ROOT / stage).glob("*.py") for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]+", f.read_text())}
    assert not sorted((o, f) for o, f in named if o not in options | outside)


def test_every_command_keeps_the_one_error_boundary_on_its_own() -> None:
    """Every annotate-cli command, the stages' plugins included, is a runtime.options.Command: run
    through annotate-cli or invoked alone (scripts and tests do), a UserError is one line."""
    import click

    from edge_annotator.runtime.options import Command

    def walk(cmd: click.Command, path: str) -> list[str]:
        if isinstance(cmd, click.Group):
            return [p for name, sub in cmd.commands.items() for p in walk(sub, f"{path} {name}")]
        return [] if isinstance(cmd, Command) or "not installed" in (cmd.help or "") else [path]

    assert walk(cli, "annotate-cli") == []
