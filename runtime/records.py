"""annotate-cli's output records: how a result or an error is written, and how the file is read back.

    write_jsonl_line(out, result_record("s1", scores, stamp))   # {"id","labels","scores"?,"probs",stamp}
    write_jsonl_line(out, error_record(err, stamp))            # {"id","error":{file,line,field,message},stamp}
    preds = read_predictions("labels.jsonl", spec)             # [Prediction], checked against the spec
    labels, scores = by_id(preds)                              # by item id, error records left out

Every writer (annotate's job, its worker pool, Ray's actors) and every reader (agree, its report,
convert) goes through here, so the format has one definition.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import InputError, iter_rows
from .spec import TaskSpec

PROB_DIGITS = 6  # probabilities and scores are rounded here, so outputs compare byte for byte


@dataclass(frozen=True)
class Score:
    """One criterion's answer for one item: the most probable level, every level's probability,
    and (rating scales) the probability-weighted mean of the levels."""

    label: int | float | str
    probs: dict[int | float | str, float]
    score: float | None = None
    raw_score: float | None = None
    """The probability-weighted mean before the spec's calibration; None where the criterion has none."""


def jsonl_line(record: dict[str, Any]) -> str:
    """One compact, key-stable JSON line: the one serialisation of every output record."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_jsonl_line(fh: Any, record: dict[str, Any]) -> None:
    """jsonl_line, flushed so a killed job loses nothing written."""
    fh.write(jsonl_line(record))
    fh.flush()


def result_record(item_id: str, scores: Mapping[str, Score], stamp: Mapping[str, str] | None = None
                  ) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": item_id, "labels": {k: s.label for k, s in scores.items()}}
    numeric = {k: round(s.score, PROB_DIGITS) for k, s in scores.items() if s.score is not None}
    if numeric:  # rating scales only: labels have no mean
        rec["scores"] = numeric
    raw = {k: round(s.raw_score, PROB_DIGITS) for k, s in scores.items() if s.raw_score is not None}
    if raw:  # criteria with a calibration: the score before it
        rec["raw_scores"] = raw
    rec["probs"] = {k: {str(v): p for v, p in s.probs.items()} for k, s in scores.items()}
    return {**rec, **(stamp or {})}


def error_record(err: InputError, stamp: Mapping[str, str]) -> dict[str, Any]:
    return {"id": err.item_id, "error": err.to_record(), **stamp}


@dataclass(frozen=True)
class Prediction:
    """One output record read back: a result, or an error record (`error` set, nothing else)."""

    id: str
    line: int
    labels: dict[str, Any]
    scores: dict[str, float]
    probs: dict[str, dict[str, float]]
    model_sha256: str
    error: dict[str, Any] | None = None

    def confidence(self, criterion: str) -> float:
        """The chosen label's probability."""
        return float(self.probs.get(criterion, {}).get(str(self.labels.get(criterion)), math.nan))


def by_id(preds: list[Prediction]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """The result records' labels and scores by item id (error records left out): what agreement takes."""
    ok = [p for p in preds if p.error is None]
    return {p.id: p.labels for p in ok}, {p.id: p.scores for p in ok}


def read_predictions(path: str | Path, spec: TaskSpec, need_probs: bool = True) -> list[Prediction]:
    """annotate-cli's JSONL (or Parquet) output, each record checked against the spec: InputError
    names the file, line and field of the first that is not one. With need_probs=False (agree, which
    also compares labels from elsewhere) a record may carry labels alone; probs, if there, are checked."""
    out = []
    names = {c.name for c in spec.criteria}
    for row in iter_rows(path):
        if row.error:
            raise row.error
        d = row.data
        assert d is not None
        if "id" not in d:
            raise InputError(row.path, row.line, "not an annotate-cli output record: no 'id'", "id")
        sha = str(d.get("model_sha256", ""))
        if "error" in d:
            err = d["error"] if isinstance(d["error"], dict) else {"message": str(d["error"])}
            out.append(Prediction(str(d["id"]), row.line, {}, {}, {}, sha, err))
            continue
        labels, probs, scores = d.get("labels"), d.get("probs"), d.get("scores") or {}
        if not isinstance(labels, dict) or set(labels) != names:
            raise InputError(row.path, row.line, f"must map every criterion of spec '{spec.name}' "
                             f"({', '.join(sorted(names))}) to a label", "labels", str(d["id"]))
        if probs is None and not need_probs:
            probs = {}
        elif not isinstance(probs, dict) or set(probs) != names:
            raise InputError(row.path, row.line, "must map every criterion to its levels' probabilities",
                             "probs", str(d["id"]))
        if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) for v in scores.values()):
            raise InputError(row.path, row.line, "must map criteria to numbers", "scores", str(d["id"]))
        out.append(Prediction(str(d["id"]), row.line, labels, {k: float(v) for k, v in scores.items()}, probs, sha))
    return out
