"""The shipped data subsets and the converters that made them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DATA, SHARED_DATA, TASKS
from prepare_data import convert  # scripts/

from edge_annotator.runtime.data import check_item, iter_rows, read_human
from edge_annotator.runtime.spec import load_spec

SHIPPED = sorted(DATA.glob("*.jsonl"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_data_matches_its_spec(path: Path) -> None:
    spec = load_spec(TASKS / f"{path.name.split('-')[0]}.yaml")
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
@pytest.mark.parametrize("name, split", [("emobank", "test"), ("goemotions", "test"), ("convabuse", "test")])
def test_converters_are_seeded_and_valid(name: str, split: str) -> None:
    a = convert(name, SHARED_DATA / name, split, limit=20, seed=1)
    b = convert(name, SHARED_DATA / name, split, limit=20, seed=1)
    assert a == b and len(a) == 20
    assert convert(name, SHARED_DATA / name, split, limit=20, seed=2) != a


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_shipped_subsets_are_reproducible() -> None:
    import json

    for path in SHIPPED:
        name, split, n = path.stem.split("-")
        items = convert(name, SHARED_DATA / name, split, limit=int(n), seed=0)
        assert [json.loads(line) for line in path.read_text().splitlines()] == items, path.name


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
