"""The shipped data subsets and the converters that made them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DATA, SHARED_DATA, TASKS
from prepare_data import convert, release  # scripts/

from edge_annotator.runtime.data import check_item, iter_rows, read_human
from edge_annotator.runtime.spec import load_spec

SHIPPED = sorted(DATA.glob("*.jsonl"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_data_matches_its_spec(path: Path) -> None:
    spec = load_spec(TASKS / f"{path.name.split('-')[0].replace('_', '-')}.yaml")
    ids = [check_item(row, spec).id for row in iter_rows(path)]
    assert len(ids) == len(set(ids)) > 0
    humans = read_human(path, spec)
    assert all(humans[i] for i in ids), "every shipped item carries human labels"
    assert (DATA / "README.md").read_text().count(path.name) == 1, "each shipped file is attributed in data/README.md"


def test_emobank_keeps_every_reader() -> None:
    humans = read_human(DATA / "emobank-test-50.jsonl", load_spec(TASKS / "emobank.yaml"))
    counts = [len(r) for r in humans.values()]
    assert min(counts) >= 2 and max(counts) <= 8


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("name, split", [("emobank", "test"), ("emobank_passages", "test"), ("goemotions", "test"),
                                         ("convabuse", "test")])
def test_converters_are_seeded_and_valid(name: str, split: str) -> None:
    src = release(SHARED_DATA, name)
    a = convert(name, src, split, limit=20, seed=1)
    b = convert(name, src, split, limit=20, seed=1)
    assert a == b and len(a) == 20
    assert convert(name, src, split, limit=20, seed=2) != a


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_shipped_subsets_are_reproducible() -> None:
    import json

    for path in SHIPPED:
        name, split, n = path.stem.split("-")
        items = convert(name, release(SHARED_DATA, name), split, limit=int(n), seed=0)
        assert [json.loads(line) for line in path.read_text().splitlines()] == items, path.name


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_emobank_passages_are_long_items_split_by_passage() -> None:
    """Every rated document sentence is an item of exactly one split, shown inside its passage; a
    passage's items are all in one split, and a subset takes whole passages first."""
    src = SHARED_DATA / "emobank"
    splits = {s: convert("emobank_passages", src, s) for s in ("train", "dev", "test")}
    seen: dict[str, str] = {}
    for s, items in splits.items():
        for it in items:
            assert it["sentence"] in it["passage"] and len(it["passage"].split()) <= 160 + len(it["sentence"].split())
            assert seen.setdefault(it["context_id"], s) == s, "a passage's items share one split"
    ids = [it["id"] for items in splits.values() for it in items]
    assert len(ids) == len(set(ids)) > 8000
    assert 0.05 < len(splits["test"]) / len(ids) < 0.15
    assert not set(ids) & {it["id"] for it in convert("emobank", src, "test") if it["id"].startswith("SemEval")}
    sub = convert("emobank_passages", src, "train", limit=100, seed=0)
    groups = [it["context_id"] for it in sub]
    whole = {c: sum(it["context_id"] == c for it in splits["train"]) for c in set(groups[:-1]) - {groups[-1]}}
    assert all(groups.count(c) == n for c, n in whole.items()), "every passage but the last is taken whole"


def test_the_quickstart_csv_holds_the_jsonl_subset_s_ratings() -> None:
    """data/convabuse-ratings-300.csv (one row per rating) reads as the very ratings of
    convabuse-train-300.jsonl: the same items, raters and severities."""
    spec = load_spec(TASKS / "convabuse.yaml")
    csv_h = read_human(DATA / "convabuse-ratings-300.csv", spec)
    js_h = read_human(DATA / "convabuse-train-300.jsonl", spec)
    assert csv_h == js_h and len(csv_h) == 300
    assert (DATA / "README.md").read_text().count("convabuse-ratings-300.csv") == 1


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_the_quickstart_csv_is_reproducible(tmp_path: Path) -> None:
    from prepare_data import write_rating_rows

    write_rating_rows(convert("convabuse", SHARED_DATA / "convabuse", "train", limit=300, seed=0), tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_bytes() == (DATA / "convabuse-ratings-300.csv").read_bytes()
