"""annotate-cli convert: Label Studio tasks and label config, Argilla records and settings, CSV.

The Label Studio and Argilla outputs are checked by those tools' own SDKs (label-studio-sdk's
LabelInterface; argilla's Settings, questions, Record and Suggestion classes, offline) in the
virtualenv `make formats-venv` builds, since their pins clash with the project's; `make test`
builds it. Predictions are annotate-cli records: the recorded EmoBank output, and for the other
specs records made here with seeded probabilities, plus an error record each.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS
from golden import GOLDEN

from edge_annotator.runtime.annotator import expected_value
from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.spec import load_spec
from edge_annotator.runtime.tool_formats import REVIEW_KEY

FORMATS_PY = Path(os.environ.get("EDGE_ANNOTATOR_FORMATS_PY", ROOT / ".venv-formats" / "bin" / "python"))
needs_sdks = pytest.mark.skipif(not FORMATS_PY.exists(), reason="label-studio-sdk/argilla virtualenv absent: "
                                                                "make formats-venv (make test builds it)")
CASES = {"emobank": "emobank-test-50.jsonl", "convabuse": "convabuse-test-50.jsonl",
         "goemotions": "goemotions-test-50.jsonl"}
SHA = "ab" * 32


def _predictions(tmp_path: Path, task: str) -> tuple[Path, Path]:
    """annotate-cli output for the task's sample: the recorded run for EmoBank, else records with
    seeded probabilities; the third record replaced by an error record."""
    items = DATA / CASES[task]
    if task == "emobank":
        lines = (GOLDEN / "annotate-emobank-test-50.jsonl").read_text().splitlines()
    else:
        spec, rng = load_spec(TASKS / f"{task}.yaml"), np.random.default_rng(0)
        lines = []
        for line in items.read_text().splitlines():
            rec = {"id": json.loads(line)["id"], "labels": {}, "scores": {}, "probs": {}}
            for c in spec.criteria:
                p = rng.dirichlet(np.ones(len(c.scale)))
                rec["labels"][c.name] = c.values[int(np.argmax(p))]
                rec["probs"][c.name] = {str(v): round(float(x), 6) for v, x in zip(c.values, p)}
                if (s := expected_value(c, list(p))) is not None:
                    rec["scores"][c.name] = round(s, 6)
            lines.append(json.dumps({**rec, "model_sha256": SHA, "spec_sha256": spec.sha256}))
    first = json.loads(lines[2])
    lines[2] = json.dumps({"id": first["id"], "error": {"file": str(items), "line": 3, "field": "text",
                                                        "message": "is empty"}, "model_sha256": first["model_sha256"]})
    pred = tmp_path / f"{task}-pred.jsonl"
    pred.write_text("\n".join(lines) + "\n")
    return pred, items


def _convert(*args: str):
    return CliRunner().invoke(cli, ["convert", *args], catch_exceptions=False)


def _converted(tmp_path: Path, task: str, fmt: str, extra: str, extra_name: str) -> tuple[Path, Path, Path, Any]:
    """The task's predictions converted to FMT with --items: (predictions, output, the file EXTRA wrote, spec)."""
    pred, items = _predictions(tmp_path, task)
    out, side = tmp_path / f"{fmt}.json", tmp_path / extra_name
    r = _convert(str(pred), "--to", fmt, "--spec", str(TASKS / f"{task}.yaml"), "--items", str(items), "-o", str(out),
                 extra, str(side))
    assert r.exit_code == 0, r.output
    return pred, out, side, load_spec(TASKS / f"{task}.yaml")


def _sdk_check(kind: str, a: Path, b: Path) -> dict:
    r = subprocess.run([str(FORMATS_PY), str(ROOT / "tests" / "tools" / "formats_check.py"), kind, str(a), str(b)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_csv_has_one_row_per_record_and_flags_errors(tmp_path: Path) -> None:
    pred, items = _predictions(tmp_path, "emobank")
    out = tmp_path / "labels.csv"
    r = _convert(str(pred), "--to", "csv", "--spec", str(TASKS / "emobank.yaml"), "--items", str(items), "-o", str(out))
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    recs = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [row["id"] for row in rows] == [rec["id"] for rec in recs] and len(rows) == 50
    assert rows[2]["error"] == "is empty" and rows[2]["Valence_label"] == ""
    good = recs[0]
    assert rows[0]["Valence_label"] == str(good["labels"]["Valence"])
    assert float(rows[0]["Valence_score"]) == good["scores"]["Valence"]
    assert float(rows[0]["Valence_p_max"]) == good["probs"]["Valence"][str(good["labels"]["Valence"])]
    assert rows[0]["text"] == json.loads(items.read_text().splitlines()[0])["text"]
    assert "1 error records, flagged" in r.stderr


@needs_sdks
@pytest.mark.parametrize("task", sorted(CASES))
def test_label_studio_config_parses_and_every_prediction_validates(tmp_path: Path, task: str) -> None:
    pred, tasks, config, spec = _converted(tmp_path, task, "label-studio", "--label-config", "config.xml")
    got = _sdk_check("label-studio", config, tasks)
    assert got["controls"] == [c.name for c in spec.criteria] and got["objects"] == spec.input_names
    assert (got["tasks"], got["predictions"], got["invalid"]) == (50, 49, 0), got
    t = json.loads(tasks.read_text())
    assert t[2]["predictions"] == [] and t[2]["data"]["edge_annotator_error"] == "is empty"
    assert t[0]["predictions"][0]["model_version"] == json.loads(pred.read_text().splitlines()[0])["model_sha256"][:12]
    assert set(t[0]["data"]) >= set(spec.input_names) | {"id", "edge_annotator"}
    # a labeller's controls: stars for 1..5, the levels as choices otherwise, the label pre-selected,
    # pointed at the judged field (the last input: the sentence, the user's message, the comment)
    xml = config.read_text()
    first = json.loads(pred.read_text().splitlines()[0])
    res = t[0]["predictions"][0]["result"][0]
    if task == "emobank":
        assert xml.count("<Rating ") == 3 and 'maxRating="5"' in xml and "<Number" not in xml
        assert res["type"] == "rating" and res["value"] == {"rating": first["labels"]["Valence"]}
    else:
        assert xml.count("<Choices ") == 1 and "<Rating" not in xml and "<Number" not in xml
        assert res["type"] == "choices" and res["value"] == {"choices": [str(first["labels"][spec.criteria[0].name])]}
    assert res["to_name"] == spec.inputs[-1].name and f'toName="{spec.inputs[-1].name}"' in xml
    assert t[0]["data"]["edge_annotator_model"].startswith(f"{spec.criteria[0].name} ")
    assert "$edge_annotator_model" in xml
    # the check can fail: a label outside the config is invalid
    t[0]["predictions"][0]["result"][0]["value"] = ({"rating": "five"} if task == "emobank"
                                                    else {"choices": ["no such label"]})
    tasks.write_text(json.dumps(t))
    assert _sdk_check("label-studio", config, tasks)["invalid"] == 1


@needs_sdks
@pytest.mark.parametrize("task", sorted(CASES))
def test_argilla_settings_and_records_build_with_the_sdk(tmp_path: Path, task: str) -> None:
    pred, records, settings, spec = _converted(tmp_path, task, "argilla", "--settings", "settings.json")
    got = _sdk_check("argilla", settings, records)
    assert (got["records"], got["suggestions"], got["invalid"]) == (50, 49 * len(spec.criteria), 0), got
    want = "RatingQuestion" if task == "emobank" else "LabelQuestion"  # -2..2 and 28 labels are label questions
    assert set(got["questions"].values()) == {want}
    recs = json.loads(records.read_text())
    assert recs[2]["suggestions"] == [] and recs[2]["metadata"] == {"edge_annotator_error": "is empty"}
    sg, sha = recs[0]["suggestions"][0], json.loads(pred.read_text().splitlines()[0])["model_sha256"]
    assert sg["type"] == "model" and sg["agent"] == f"edge-annotator/{spec.name}@{sha[:12]}"


def test_bad_prediction_records_name_file_line_and_field(tmp_path: Path) -> None:
    pred, items = _predictions(tmp_path, "emobank")
    lines = pred.read_text().splitlines()
    bad = json.loads(lines[4])
    del bad["probs"]["Arousal"]
    lines[4] = json.dumps(bad)
    pred.write_text("\n".join(lines) + "\n")
    r = _convert(str(pred), "--to", "csv", "--spec", str(TASKS / "emobank.yaml"), "-o", str(tmp_path / "x.csv"))
    assert r.exit_code == 1 and f"{pred}:5: field 'probs'" in r.output, r.output
    few = tmp_path / "few.jsonl"
    few.write_text("".join(items.read_text().splitlines(keepends=True)[:10]))
    pred.write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    r = _convert(str(pred), "--to", "csv", "--spec", str(TASKS / "emobank.yaml"), "--items", str(few),
                 "-o", str(tmp_path / "y.csv"))
    assert r.exit_code == 1 and "is not in the items file" in r.output, r.output


def test_label_studio_controls_point_at_the_field_each_criterion_judges(tmp_path: Path) -> None:
    """qa-rubric's criteria judge the answer (its last input) unless the spec names another field."""
    import yaml

    from edge_annotator.runtime.spec import parse_spec
    from edge_annotator.runtime.tool_formats import label_studio_config

    raw = yaml.safe_load((TASKS / "qa-rubric.yaml").read_text())
    xml = label_studio_config(parse_spec(raw))
    assert xml.count('toName="answer"') == 6 and xml.count("<Choices ") == 6  # -2..2 is no star scale
    assert '<Choice value="-2" hint="(-2) fails badly on this criterion"/>' in xml
    raw["criteria"][4]["judges"] = "context"
    xml = label_studio_config(parse_spec(raw))
    assert xml.count('toName="answer"') == 5 and xml.count('toName="context"') == 1
    raw["criteria"][4]["judges"] = "nowhere"
    from edge_annotator.runtime.spec import SpecError

    with pytest.raises(SpecError, match="judges 'nowhere', which is not an input"):
        parse_spec(raw)


@needs_sdks
def test_a_trust_rules_marks_reach_the_labelling_tools(tmp_path: Path) -> None:
    """Records with `accept` marks: Label Studio's header says "accepted" or "to review" for each
    label, Argilla's metadata names the criteria to review (and the settings declare it), and
    --accepted-only pre-selects only the accepted labels; both tools' SDKs take the result."""
    import yaml

    pred, items = _predictions(tmp_path, "emobank")
    spec = load_spec(TASKS / "emobank.yaml")
    rule = {"method": "test", "target": 0.1, "delta": 0.1, "tolerance": 0.5, "threshold": 0.5, "items": 100,
            "accepted": 40, "disagree": 2, "bound": 0.09}
    raw = spec.to_dict()
    for c in raw["criteria"]:
        c["trust"] = rule
    spec_path = tmp_path / "trusted.yaml"
    spec_path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    recs = [json.loads(x) for x in pred.read_text().splitlines()]
    for k, rec in enumerate(recs):
        if "error" not in rec:
            rec["accept"] = {"Valence": k % 2 == 0, "Arousal": True, "Dominance": k % 3 != 0}
    pred.write_text("".join(json.dumps(r) + "\n" for r in recs))
    common = ["--spec", str(spec_path), "--items", str(items)]
    tasks, config = tmp_path / "tasks.json", tmp_path / "config.xml"
    r = _convert(str(pred), "--to", "label-studio", *common, "-o", str(tasks), "--label-config", str(config),
                 "--accepted-only")
    assert r.exit_code == 0, r.output
    got = _sdk_check("label-studio", config, tasks)
    assert (got["tasks"], got["invalid"]) == (50, 0), got
    t = json.loads(tasks.read_text())
    assert [x["from_name"] for x in t[0]["predictions"][0]["result"]] == ["Valence", "Arousal", REVIEW_KEY]
    assert [x["from_name"] for x in t[1]["predictions"][0]["result"]] == ["Arousal", "Dominance", REVIEW_KEY]
    assert t[0]["predictions"][0]["result"][-1]["value"] == {"text": ["to review: Dominance"]}
    assert [x["predictions"][0]["score"] for x in t[:2]] == [2 / 3, 2 / 3]
    assert t[4]["predictions"][0]["result"][-1]["value"] == {"text": ["accepted: every label"]}
    assert f'<TextArea name="{REVIEW_KEY}"' in config.read_text()
    assert "(score" in t[1]["data"]["edge_annotator_model"] and "to review)" in t[1]["data"]["edge_annotator_model"]
    records, settings = tmp_path / "records.json", tmp_path / "settings.json"
    r = _convert(str(pred), "--to", "argilla", *common, "-o", str(records), "--settings", str(settings))
    assert r.exit_code == 0, r.output
    got = _sdk_check("argilla", settings, records)
    assert (got["records"], got["suggestions"], got["invalid"]) == (50, 49 * 3, 0), got
    out = json.loads(records.read_text())
    assert out[0]["metadata"] == {"edge_annotator_review": ["Dominance"]}
    assert out[4]["metadata"] == {"edge_annotator_review": "none"}
    assert "edge_annotator_review" in [m["name"] for m in json.loads(settings.read_text())["metadata"]]
    r = _convert(str(pred), "--to", "csv", "--spec", str(TASKS / "emobank.yaml"), "-o", str(tmp_path / "x.csv"),
                 "--accepted-only")
    assert r.exit_code == 2 and "--accepted-only" in r.output
