"""Human-label files: never read as nothing, what `data check` reports, `data split` by item, and
the wide layout turned into rows (runtime/labels.py, runtime/data.py: Coverage)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, TASKS

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.data import InputError
from edge_annotator.runtime.spec import parse_spec

SUPPORT = {
    "name": "support", "inputs": [{"name": "ticket", "title": "Ticket"}, {"name": "reply", "title": "Reply"}],
    "criteria": [{"name": n, "level": "ordinal", "scale": [{"value": v, "anchor": a} for v, a in
                                                          zip(range(1, 6), ["bad", "weak", "fair", "good", "great"])]}
                 for n in ("Helpfulness", "Politeness")],
    "templates": ["Rate the support reply.\n\n{rubric}"],
    "answer_cue": "{criterion} ({min}-{max}):",
}


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    import yaml

    p = tmp_path / "support.yaml"
    p.write_text(yaml.safe_dump(SUPPORT))
    return p


def _csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _items(n: int = 12) -> list[dict[str, object]]:
    return [{"id": f"t{i}", "ticket": f"My order {i} is late.", "reply": f"Sorry, order {i} ships today."}
            for i in range(n)]


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("case, needle", [
    ("wide", "look like one column per rater: annotate-cli data reshape"),
    ("misspelt", "Misspelt? 'Helpfullness' for 'Helpfulness'"),
    ("other key", "Labels must sit under 'labels'"),
])
def test_a_label_file_read_as_nothing_stops_with_one_line(tmp_path: Path, spec_file: Path, case: str,
                                                          needle: str) -> None:
    """A wide CSV, a CSV with misspelt criterion columns and a JSONL with labels under another key:
    agree and data check each exit 1 with one line naming the file, the columns found, the spec's
    criteria and the layouts accepted (before: 0 items, exit 0)."""
    its = _items()
    if case == "wide":
        human = _csv(tmp_path / "wide.csv", [{**it, "Helpfulness_r1": 4, "Helpfulness_r2": 5, "Politeness_r1": 3,
                                              "Politeness_r2": 4} for it in its])
    elif case == "misspelt":
        human = _csv(tmp_path / "typo.csv", [{**it, "Helpfullness": 4, "Politness": 3} for it in its])
    else:
        human = tmp_path / "other.jsonl"
        human.write_text("".join(json.dumps({**it, "scores": {"Helpfulness": 4, "Politeness": 3}}) + "\n"
                                 for it in its))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"id": it["id"], "labels": {"Helpfulness": 4, "Politeness": 4}}) + "\n"
                            for it in its))
    for args in (["agree", str(pred), str(human), "--spec", str(spec_file)],
                 ["data", "check", str(human), "--spec", str(spec_file)]):
        r = _run(*args)
        assert r.exit_code == 1, r.output
        msg = r.output.strip()
        assert msg.count("\n") == 0 and msg.startswith(f"Error: {human}:"), msg
        assert "Columns found: id, ticket, reply" in msg and "Helpfulness, Politeness" in msg, msg
        assert "Accepted layouts:" in msg and needle in msg, msg


def test_training_refuses_a_file_in_which_one_criterion_has_no_rating(tmp_path: Path) -> None:
    """agree compares what is there; training needs every criterion rated somewhere."""
    from edge_annotator.train.examples import load_items

    spec = parse_spec(SUPPORT)
    path = _csv(tmp_path / "half.csv", [{**it, "Helpfulness": 4, "Politness": 2} for it in _items()])
    with pytest.raises(InputError, match=r"no record rates 'Politeness'.*Misspelt\? 'Politness' for 'Politeness'"):
        load_items(path, spec)


def test_data_check_reports_levels_agreement_and_warnings(tmp_path: Path, spec_file: Path) -> None:
    rows = []
    for i, it in enumerate(_items(20)):
        for k in range(3):
            # Politeness: "5" for all but one rating (> 90%); Helpfulness: levels 2-4 only
            rows.append({**it, "rater": f"r{k}", "Helpfulness": 2 + (i + k) % 3, "Politeness": 5 if i or k else 4})
    path = _csv(tmp_path / "labels.csv", rows)
    r = _run("data", "check", str(path), "--spec", str(spec_file), "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert (got["items"], got["ratings"], got["named_raters"]) == (20, 60, 3)
    assert got["raters_per_item"] == {"mean": 3.0, "min": 3, "max": 3}
    h, p = got["criteria"]
    assert h["levels"] == {"1": 0, "2": 20, "3": 20, "4": 20, "5": 0} and h["alpha_humans"] is not None
    assert "one_human_vs_rest" in h
    assert any("Helpfulness: level(s) 1, 5 never used" in w for w in got["warnings"])
    assert any("Politeness: level 5 holds 98%" in w for w in got["warnings"])
    r = _run("data", "check", str(path), "--spec", str(spec_file))
    assert r.exit_code == 0 and "one human" in r.output and "warning:" in r.output


def test_data_check_on_a_shipped_multi_rater_sample() -> None:
    r = _run("data", "check", str(DATA / "emobank-test-50.jsonl"), "--spec", str(TASKS / "emobank.yaml"), "--json")
    got = json.loads(r.output)
    assert r.exit_code == 0 and got["items"] == 50 and got["raters_per_item"]["min"] >= 5
    # the raters' own alpha on these 50 sentences, as agree reports it (README: 0.157 Valence)
    assert got["criteria"][0]["alpha_humans"] == pytest.approx(0.1573, abs=1e-3)


def test_data_split_is_by_item_deterministic_and_keeps_every_record(tmp_path: Path, spec_file: Path) -> None:
    rows = [{**it, "rater": f"r{k}", "Helpfulness": 1 + (i + k) % 5, "Politeness": 1 + (i * k) % 5,
             "thread": f"th{i // 4}"} for i, it in enumerate(_items(40)) for k in range(2)]
    path = _csv(tmp_path / "labels.csv", rows)
    r = _run("data", "split", str(path), "--spec", str(spec_file), "--test", "0.2", "--val", "0.1", "-o",
             str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    parts = {n: [json.loads(x) for x in (tmp_path / "a" / f"{n}.jsonl").read_text().splitlines()]
             for n in ("train", "val", "test")}
    ids = {n: {x["id"] for x in rs} for n, rs in parts.items()}
    assert [len(ids[n]) for n in ("train", "val", "test")] == [28, 4, 8]
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"]) and not (ids["val"] & ids["test"])
    assert sum(len(rs) for rs in parts.values()) == 80  # both raters' records of each item, together
    assert all(sum(x["id"] == i for x in parts[n]) == 2 for n in parts for i in ids[n])
    info = json.loads((tmp_path / "a" / "split.json").read_text())
    assert info["sizes"]["test"] == {"items": 8, "records": 16, "ratings": 16}
    # the same seed gives the same bytes; another seed another split
    _run("data", "split", str(path), "--spec", str(spec_file), "-o", str(tmp_path / "b"))
    _run("data", "split", str(path), "--spec", str(spec_file), "--seed", "1", "-o", str(tmp_path / "c"))
    same = [(tmp_path / d / "test.jsonl").read_text() for d in ("a", "b", "c")]
    assert same[0] == same[1] and same[0] != same[2]
    # --group: items sharing a thread never straddle two splits
    r = _run("data", "split", str(path), "--spec", str(spec_file), "--group", "thread", "-o", str(tmp_path / "g"))
    assert r.exit_code == 0, r.output
    threads = {n: {json.loads(x)["thread"] for x in (tmp_path / "g" / f"{n}.jsonl").read_text().splitlines()}
               for n in ("train", "val", "test")}
    assert not (threads["train"] & threads["test"]) and len(threads["test"]) == 2
    r = _run("data", "split", str(path), "--spec", str(spec_file), "--test", "0.7", "--val", "0.5", "-o",
             str(tmp_path / "x"))
    assert r.exit_code == 2 and "together below 1" in r.output


def test_data_reshape_turns_one_column_per_rater_into_records(tmp_path: Path, spec_file: Path) -> None:
    its = _items(5)
    wide = _csv(tmp_path / "wide.csv", [{**it, "Helpfulness_r1": 4, "Helpfulness_r2": 5, "Politeness_r1": 3,
                                         "Politeness_r2": "" if i == 0 else 2} for i, it in enumerate(its)])
    out = tmp_path / "long.jsonl"
    r = _run("data", "reshape", str(wide), "--spec", str(spec_file), "-o", str(out))
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 10 and recs[0] == {"id": "t0", "ticket": its[0]["ticket"], "reply": its[0]["reply"],
                                            "rater": "r1", "labels": {"Helpfulness": "4", "Politeness": "3"}}
    assert recs[1]["labels"] == {"Helpfulness": "5"}  # an empty cell is no rating
    r = _run("data", "check", str(out), "--spec", str(spec_file), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ratings"] == 10
    bad = _csv(tmp_path / "bad.csv", [{**its[0], "Helpfulness_r1": 9}])
    r = _run("data", "reshape", str(bad), "--spec", str(spec_file), "-o", str(tmp_path / "x.jsonl"))
    assert r.exit_code == 1 and "bad.csv:2: field 'Helpfulness_r1': '9' is outside the scale 1..5" in r.output
