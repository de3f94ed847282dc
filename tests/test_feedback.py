"""Labels back from the labelling tools (runtime/feedback.py, `annotate-cli data import`).

tests/golden/label-studio-export.json is what a real Label Studio 1.23.2 server exported after
`make label-studio-check` imported annotate-cli convert's tasks for the golden EmoBank output,
annotated 5 of them through its API (each criterion one level above the model's label, the top
level kept) and cancelled a 6th; that check makes and imports the export again on every
`make test`. Argilla's records are built and serialised by the argilla SDK itself, offline."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS
from test_convert import FORMATS_PY, needs_sdks

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.data import InputError, read_human
from edge_annotator.runtime.feedback import from_label_studio
from edge_annotator.runtime.spec import load_spec
from edge_annotator.runtime.tool_formats import read_inputs

GOLDEN = ROOT / "tests" / "golden"
EXPORT = GOLDEN / "label-studio-export.json"
PRED = GOLDEN / "annotate-emobank-test-50.jsonl"
ITEMS = DATA / "emobank-test-50.jsonl"
SPEC = TASKS / "emobank.yaml"


def _model_labels() -> dict[str, dict[str, int]]:
    return {r["id"]: r["labels"] for r in map(json.loads, PRED.read_text().splitlines())}


def test_a_label_studio_export_becomes_one_rating_per_annotation() -> None:
    spec = load_spec(SPEC)
    records, counts = from_label_studio(EXPORT, spec, read_inputs(ITEMS, spec))
    assert counts["records"] == 5 and counts["cancelled"] == 1 and counts["annotations"] == 6
    model = _model_labels()
    for r in records:  # the expert's correction, not the model's pre-annotation
        assert r["labels"] == {k: min(v + 1, 5) for k, v in model[r["id"]].items()}
        assert r["text"] and r["rater"]
    assert len({r["id"] for r in records}) == 5


def test_a_task_whose_text_changed_is_refused_by_name(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    tasks = json.loads(EXPORT.read_text())
    t = next(t for t in tasks if t.get("annotations"))
    t["data"]["text"] += " (edited)"
    changed = tmp_path / "export.json"
    changed.write_text(json.dumps(tasks))
    with pytest.raises(InputError, match=f"item '{t['data']['id']}': its text is not the text that was annotated"):
        from_label_studio(changed, spec, read_inputs(ITEMS, spec))
    records, _ = from_label_studio(changed, spec)  # without the items file there is nothing to compare with
    assert len(records) == 5


def test_data_import_writes_labels_that_train_and_agree_read(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    r = CliRunner().invoke(cli, ["data", "import", str(EXPORT), "--from", "label-studio", "--spec", str(SPEC),
                                 "--items", str(ITEMS), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "5 ratings of 5 items by 1 rater; dropped: 1 cancelled" in " ".join(r.stderr.split())
    humans = read_human(out, load_spec(SPEC))
    assert len(humans) == 5 and all(len(v) == 1 for v in humans.values())
    r = CliRunner().invoke(cli, ["data", "check", str(out), "--spec", str(SPEC), "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["agree", str(PRED), str(out), "--spec", str(SPEC), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["items_with_humans"] == 5
    bad = tmp_path / "not-an-export.json"
    bad.write_text('{"tasks": 1}')
    r = CliRunner().invoke(cli, ["data", "import", str(bad), "--from", "label-studio", "--spec", str(SPEC),
                                 "-o", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 1 and "not a Label Studio JSON export" in r.output


@needs_sdks
def test_argilla_records_with_responses_from_the_sdk_become_one_rating_per_user(tmp_path: Path) -> None:
    records = tmp_path / "records.json"
    r = CliRunner().invoke(cli, ["convert", str(PRED), "--to", "argilla", "--spec", str(SPEC), "--items", str(ITEMS),
                                 "-o", str(records)])
    assert r.exit_code == 0, r.output
    ids = [x["id"] for x in json.loads(records.read_text())]
    ann, bea = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))
    plan = {ids[0]: [{"user": ann, "values": {"Valence": 4, "Arousal": 2, "Dominance": 3}},
                     {"user": bea, "values": {"Valence": 5}}],
            ids[1]: [{"user": bea, "values": {"Arousal": 1}}]}
    plan_f = tmp_path / "plan.json"
    plan_f.write_text(json.dumps(plan))
    sdk = subprocess.run([str(FORMATS_PY), str(ROOT / "tests" / "tools" / "formats_check.py"), "argilla-responses",
                          str(records), str(plan_f)], capture_output=True, text=True, timeout=300)
    assert sdk.returncode == 0, sdk.stderr[-2000:]
    exported = tmp_path / "exported.json"
    exported.write_text(sdk.stdout)
    out = tmp_path / "labels.jsonl"
    r = CliRunner().invoke(cli, ["data", "import", str(exported), "--from", "argilla", "--spec", str(SPEC),
                                 "--items", str(ITEMS), "-o", str(out)])
    assert r.exit_code == 0, r.output
    got = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [(g["id"], g["rater"], g["labels"]) for g in got] == [
        (ids[0], ann, {"Valence": 4, "Arousal": 2, "Dominance": 3}), (ids[0], bea, {"Valence": 5}),
        (ids[1], bea, {"Arousal": 1})]
    assert "3 ratings of 2 items by 2 raters" in " ".join(r.stderr.split())
