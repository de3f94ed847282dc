"""Human-label files: what they hold, a split by item, and one column per rater turned into rows.

    summary = check_labels("labels.csv", spec)             # annotate-cli data check
    sizes = split_labels("labels.csv", spec, "split/", test=0.2, val=0.1, seed=0)   # data split
    reshape_wide("wide.csv", spec, "labels.jsonl")         # data reshape

Each reads through runtime/data.py, so a file read as nothing stops with the same one line as
agree and train give (data.Coverage), and a bad record names its file, line and field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Coverage, InputError, Item, Row, check_item, iter_rows, ratings_of
from .errors import UserError
from .files import atomic_write
from .metrics import _alpha, _code, leave_one_out
from .spec import TaskSpec

DOMINANT = 0.90
"""A level holding more than this share of a criterion's ratings gets a warning: an annotator that
always answers it agrees on most items and learns nothing (EmoBank's "3" holds 74-85%)."""


@dataclass
class Labelled:
    """The items of a human-label file, each with every rating it has, and the rows they came from."""

    items: list[Item]
    rows: dict[str, list[dict[str, Any]]]
    """id -> the file's records of that item, as read (every column kept)."""


def read_labelled(path: str | Path, spec: TaskSpec, strict: bool = True, rated: bool = True) -> Labelled:
    """Every item with its ratings; rows sharing an id are one item (one row per rater). Stops on
    the first bad record, and (Coverage, unless RATED is False: items that may carry no ratings at
    all) on a file whose records rate none of the spec's criteria, or with strict, one of them."""
    items: dict[str, Item] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    seen = Coverage(str(path), spec)
    for row in iter_rows(path):
        it = check_item(row, spec)
        rs = ratings_of(row, spec)
        assert row.data is not None
        seen.add(row.data, rs)
        if it.id in items:
            if items[it.id].fields != it.fields:
                raise InputError(row.path, row.line, f"item '{it.id}' appears with other inputs at line "
                                 f"{items[it.id].line}; give each item one id", "id", it.id)
            items[it.id].ratings.extend(rs)
        else:
            items[it.id] = Item(it.id, it.fields, it.path, it.line, list(rs))
        rows.setdefault(it.id, []).append(row.data)
    if rated:
        seen.check(strict=strict)
    return Labelled(list(items.values()), rows)


def check_labels(path: str | Path, spec: TaskSpec, seed: int = 0) -> dict[str, Any]:
    """What a human-label file holds: items, ratings, raters per item, each criterion's levels and
    the humans' own agreement (among themselves, and one held-out rater against the others), with
    warnings where a level is never used or one holds more than 90% of the ratings."""
    data = read_labelled(path, spec, strict=False)
    items = data.items
    per_item = [len(it.ratings) for it in items]
    raters = {str(r.get("rater")) for rs in data.rows.values() for r in rs if r.get("rater") not in (None, "")}
    out: dict[str, Any] = {"file": str(path), "spec": spec.name, "items": len(items),
                           "ratings": int(sum(per_item)), "unrated_items": sum(n == 0 for n in per_item),
                           "raters_per_item": _spread(per_item), "named_raters": len(raters),
                           "criteria": [], "warnings": []}
    for c in spec.criteria:
        vals = {it.id: [r[c.name] for r in it.ratings if c.name in r] for it in items}
        flat = [v for vs in vals.values() for v in vs]
        counts = Counter(str(v) for v in flat)
        levels = {str(v): counts.get(str(v), 0) for v in c.values}
        off = sorted(k for k in counts if k not in levels)  # interval scales allow values between levels
        row: dict[str, Any] = {"criterion": c.name, "level": c.level, "ratings": len(flat),
                               "items": sum(bool(v) for v in vals.values()), "levels": levels}
        if off:
            row["between_levels"] = sum(counts[k] for k in off)
        multi = [vs for vs in vals.values() if len(vs) >= 2]
        if multi:
            k = max(len(vs) for vs in multi)
            grid = [[_code(c, vs[j]) if j < len(vs) else np.nan for vs in multi] for j in range(k)]
            row["alpha_humans"] = _alpha(grid, c.level)
            loo = leave_one_out(c, {i: vs[0] for i, vs in vals.items() if len(vs) >= 2},
                                {i: vs for i, vs in vals.items() if len(vs) >= 2}, resamples=200, seed=seed)
            if loo:
                row["one_human_vs_rest"] = loo["human_alpha"]
                row["one_human_vs_rest_ci"] = loo.get("human_alpha_ci")
        out["criteria"].append(row)
        if not flat:
            out["warnings"].append(f"{c.name}: no rating at all; training and agree need some")
            continue
        unused = [k for k, n in levels.items() if n == 0]
        if unused:
            out["warnings"].append(f"{c.name}: level(s) {', '.join(unused)} never used")
        top, n = max(levels.items(), key=lambda kv: kv[1])
        if n > DOMINANT * len(flat):
            out["warnings"].append(f"{c.name}: level {top} holds {n / len(flat):.0%} of the ratings; an annotator "
                                   f"that always answers it agrees on most items and says nothing")
    if any(n < 2 for n in per_item if n):
        single = sum(n == 1 for n in per_item)
        out["warnings"].append(f"{single} item(s) have a single rating: no humans' alpha there, and their target "
                               f"is one rater's view")
    return out


def _spread(xs: list[int]) -> dict[str, float]:
    return {"mean": round(float(np.mean(xs)), 2), "min": int(min(xs)), "max": int(max(xs))} if xs else {}


SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "split.json")
"""What `data split` writes into its folder."""


def split_labels(path: str | Path, spec: TaskSpec, out_dir: str | Path, test: float = 0.2, val: float = 0.1,
                 seed: int = 0, group: str | None = None) -> dict[str, Any]:
    """Split a human-label file by item into DIR/train.jsonl, val.jsonl and test.jsonl (every record
    of an item in one split, every column kept) and DIR/split.json (what was done).

    Deterministic: ids (or, with `group`, the values of that field, so that items sharing a
    context never straddle two splits) are ordered by a seeded hash, then cut; the same file, seed
    and fractions give the same split on any machine."""
    if not (0 <= test < 1 and 0 <= val < 1 and test + val < 1):
        raise UserError(f"--test {test} and --val {val}: each must be in [0, 1) and together below 1")
    data = read_labelled(path, spec)
    key_of: dict[str, str] = {}
    for it in data.items:
        if group is None:
            key_of[it.id] = it.id
            continue
        row = data.rows[it.id][0]
        if group not in row:
            raise InputError(it.path, it.line, f"missing: --group {group} names no field of this record", group, it.id)
        key_of[it.id] = str(row[group])
    keys = sorted(set(key_of.values()), key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    n_test, n_val = round(test * len(keys)), round(val * len(keys))
    if test > 0 and n_test == 0 or val > 0 and n_val == 0:
        raise UserError(f"{len(keys)} {'groups' if group else 'items'} are too few for --test {test} --val {val}")
    part = {k: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, k in enumerate(keys)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, dict[str, int]] = {}
    for name in ("train", "val", "test"):
        mine = [it for it in data.items if part[key_of[it.id]] == name]
        lines = [json.dumps(r, ensure_ascii=False, default=str) + "\n" for it in mine for r in data.rows[it.id]]
        atomic_write(out / f"{name}.jsonl", "".join(lines))
        sizes[name] = {"items": len(mine), "records": len(lines), "ratings": sum(len(it.ratings) for it in mine)}
    info = {"source": str(path), "spec": spec.name, "seed": seed, "test": test, "val": val, "group": group,
            "sizes": sizes, "ids_sha256": {n: hashlib.sha256("\n".join(sorted(
                it.id for it in data.items if part[key_of[it.id]] == n)).encode()).hexdigest()
                for n in ("train", "val", "test")}}
    atomic_write(out / "split.json", json.dumps(info, indent=2) + "\n")
    return info


def reshape_wide(path: str | Path, spec: TaskSpec, out: str | Path,
                 pattern: str = "{criterion}_{rater}") -> dict[str, Any]:
    """One column per rater and criterion (`Helpfulness_r1, Helpfulness_r2, ...`) to one record per
    rater, `{"id", inputs..., "rater", "labels"}`, the layout every other command reads. `pattern`
    says how a column name joins criterion and rater. An empty cell is no rating."""
    if "{criterion}" not in pattern or "{rater}" not in pattern:
        raise UserError(f"--pattern {pattern!r} must contain {{criterion}} and {{rater}}")
    names = "|".join(re.escape(c.name) for c in sorted(spec.criteria, key=lambda c: -len(c.name)))
    rx = re.compile("^" + re.escape(pattern).replace(r"\{criterion\}", f"(?P<criterion>{names})")
                    .replace(r"\{rater\}", "(?P<rater>.+?)") + "$")
    records: list[str] = []
    matched: set[str] = set()
    raters: set[str] = set()
    n_items = 0
    for row in iter_rows(path):
        it = check_item(row, spec)
        assert row.data is not None
        by_rater: dict[str, dict[str, Any]] = {}
        for col, v in row.data.items():
            m = rx.match(col)
            if m and v not in ("", None):
                by_rater.setdefault(m["rater"], {})[m["criterion"]] = v
                matched.add(col)
                try:  # each value checked against the spec, reported under the column it came from
                    ratings_of(Row(row.path, row.line, {"labels": {m["criterion"]: v}}), spec)
                except InputError as e:
                    raise InputError(row.path, row.line, e.reason, col, it.id) from None
        n_items += 1
        for rater, labels in by_rater.items():
            records.append(json.dumps({"id": it.id, **it.fields, "rater": rater, "labels": labels},
                                      ensure_ascii=False) + "\n")
            raters.add(rater)
    if not records:
        example = pattern.format(criterion=spec.criteria[0].name, rater="r1")
        raise InputError(str(path), None, f"no column matches --pattern {pattern!r} for the spec's criteria "
                         f"({', '.join(spec.criterion_names)}); e.g. {example}")
    atomic_write(Path(out), "".join(records))
    return {"items": n_items, "records": len(records), "raters": sorted(raters), "columns": sorted(matched)}


def label_records(path: str | Path, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    """Every rating of a human-label file in any layout the readers take (CSV, JSONL, Parquet; one
    rating a row, or `ratings` lists) as the one canonical record, `{"id", inputs..., "rater"?,
    "labels"}`, each checked as `train` checks it: what `serve` writes for a retrain round."""
    for row in iter_rows(path):
        it = check_item(row, spec)
        assert row.data is not None
        blocks = row.data.get("ratings")
        if isinstance(blocks, list):
            pairs = [(r.get("rater") if isinstance(r, dict) else None,
                      ratings_of(Row(row.path, row.line, {"ratings": [r]}), spec)) for r in blocks]
        else:
            pairs = [(row.data.get("rater"), ratings_of(row, spec))]
        for rater, ratings in pairs:
            named = isinstance(rater, str) and rater.strip() or isinstance(rater, int) and not isinstance(rater, bool)
            who = str(rater) if named else None
            for labels in ratings:
                yield {"id": it.id, **it.fields, **({"rater": who} if who is not None else {}), "labels": labels}


def iter_split(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of one split file, as written."""
    for row in iter_rows(path):
        if row.error:
            raise row.error
        assert row.data is not None
        yield row.data
