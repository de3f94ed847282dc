"""Labels back from the labelling tools: a Label Studio JSON export or Argilla 2.x records become
the human-label JSONL that `train`, `fit` and `agree` read.

    records, counts = from_label_studio("export.json", spec, items=read_inputs("items.jsonl", spec))

One record per annotator and item: the item's id and input fields, the annotator as `rater`, and
`labels` with what they chose (`annotate-cli convert`'s tasks carry the id and the inputs in
`data`; a control is matched to a criterion by its name). Cancelled (skipped) annotations, and
annotations or responses with no label of the spec, are dropped and counted. With the items file
annotate read, a task whose text is not that item's any more is refused, naming it: a label of a
changed text is not a label of the item.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data import InputError
from .spec import Criterion, TaskSpec


def _level(c: Criterion, raw: Any, where: str, item_id: str, path: str) -> int | str:
    for v in c.values:
        if str(v) == str(raw).strip():
            return v
    raise InputError(path, None, f"{raw!r} is not a level of {c.name} ({', '.join(map(str, c.values))})",
                     where, item_id)


def _check_text(fields: Mapping[str, Any], spec: TaskSpec, item_id: str, items: Mapping[str, Mapping[str, str]] | None,
                path: str, where: str) -> dict[str, str]:
    got = {f.name: str(fields[f.name]) for f in spec.inputs if f.name in fields}
    if items is None:
        return got
    if item_id not in items:
        raise InputError(path, None, f"item '{item_id}' is not in the items file", where, item_id)
    for name, text in items[item_id].items():
        if got.get(name, text) != text:
            raise InputError(path, None, f"item '{item_id}': its {name} is not the text that was annotated "
                                         "(changed since; re-annotate it, or leave it out)", f"{where}.{name}", item_id)
    return {**dict(items[item_id]), **got}


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(str(path), e.lineno, f"not JSON: {e.msg}") from None


def _rater(who: Any) -> str:
    if isinstance(who, dict):
        return str(who.get("email") or who.get("username") or who.get("id"))
    return str(who)


def from_label_studio(path: str | Path, spec: TaskSpec, items: Mapping[str, Mapping[str, str]] | None = None
                      ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Label Studio's JSON export (a list of tasks with their `annotations`) as human-label records."""
    p = str(path)
    tasks = _read_json(path)
    if not isinstance(tasks, list):
        raise InputError(p, None, "not a Label Studio JSON export (a list of tasks): export the project as JSON")
    return records_from_tasks(tasks, spec, items, p)


def records_from_tasks(tasks: list[Any], spec: TaskSpec, items: Mapping[str, Mapping[str, str]] | None,
                       p: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Label Studio tasks with their `annotations` (an export's, or a webhook event's task and
    annotation) as human-label records; P names where they came from in errors."""
    by_name = {c.name: c for c in spec.criteria}
    out: list[dict[str, Any]] = []
    counts = {"tasks": len(tasks), "annotations": 0, "records": 0, "cancelled": 0, "without_labels": 0,
              "tasks_without_annotations": 0}
    for i, task in enumerate(tasks):
        where = f"[{i}]"
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or "id" not in data:
            raise InputError(p, None, "task has no data.id (tasks made by annotate-cli convert carry the item's id)",
                             f"{where}.data.id")
        item_id = str(data["id"])
        fields = _check_text(data, spec, item_id, items, p, f"{where}.data")
        anns = task.get("annotations") or []
        counts["tasks_without_annotations"] += not anns
        for j, ann in enumerate(anns):
            counts["annotations"] += 1
            if ann.get("was_cancelled"):
                counts["cancelled"] += 1
                continue
            labels: dict[str, int | str] = {}
            for k, r in enumerate(ann.get("result") or []):
                c = by_name.get(r.get("from_name", ""))
                if c is None:
                    continue
                value = r.get("value") or {}
                raw = value["rating"] if "rating" in value else (value.get("choices") or [None])[0]
                if raw is not None:
                    labels[c.name] = _level(c, raw, f"{where}.annotations[{j}].result[{k}].value", item_id, p)
            if not labels:
                counts["without_labels"] += 1
                continue
            out.append({"id": item_id, **fields, "rater": _rater(ann.get("completed_by")), "labels": labels})
    counts["records"] = len(out)
    return out, counts


def from_argilla(path: str | Path, spec: TaskSpec, items: Mapping[str, Mapping[str, str]] | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Argilla 2.x records as its SDK writes them (`Record.to_dict()`, `dataset.records.to_json`):
    `fields` and `responses` {question: [{value, user_id[, status]}]}; one record per user."""
    p = str(path)
    recs = _read_json(path)
    if isinstance(recs, dict) and isinstance(recs.get("records"), list):
        recs = recs["records"]
    if not isinstance(recs, list):
        raise InputError(p, None, "not Argilla records (a list of {id, fields, responses})")
    by_name = {c.name: c for c in spec.criteria}
    out: list[dict[str, Any]] = []
    counts = {"records_read": len(recs), "responses": 0, "records": 0, "discarded": 0, "without_labels": 0,
              "records_without_responses": 0}
    for i, rec in enumerate(recs):
        where = f"[{i}]"
        if not isinstance(rec, dict) or rec.get("id") in (None, ""):
            raise InputError(p, None, "record has no id (records made by annotate-cli convert carry the item's id)",
                             f"{where}.id")
        item_id = str(rec["id"])
        fields = _check_text(rec.get("fields") or {}, spec, item_id, items, p, f"{where}.fields")
        per_user: dict[str, dict[str, int | str]] = {}
        responses = rec.get("responses") or {}
        counts["records_without_responses"] += not responses
        for q, answers in responses.items():
            c = by_name.get(q)
            for k, a in enumerate(answers or []):
                counts["responses"] += 1
                if a.get("status") in ("discarded", "draft") or a.get("value") is None:
                    counts["discarded"] += 1
                    continue
                if c is None:
                    continue
                user = str(a.get("user_id"))
                per_user.setdefault(user, {})[c.name] = _level(c, a["value"], f"{where}.responses.{q}[{k}]", item_id, p)
        if responses and not per_user:
            counts["without_labels"] += 1
        out.extend({"id": item_id, **fields, "rater": user, "labels": labels} for user, labels in per_user.items())
    counts["records"] = len(out)
    return out, counts
