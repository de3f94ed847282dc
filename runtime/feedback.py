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

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data import InputError, text_value
from .spec import Criterion, TaskSpec
from .untrusted import JSONError, loads


def _level(c: Criterion, raw: Any, where: str, item_id: str, path: str) -> int | str:
    if isinstance(raw, str | int | float) and not isinstance(raw, bool):
        for v in c.values:
            if str(v) == str(raw).strip():
                return v
    raise InputError(path, None, f"{raw!r} is not a level of {c.name} ({', '.join(map(str, c.values))})",
                     where, item_id)


def _item_id(raw: Any, path: str, where: str, what: str) -> str:
    if isinstance(raw, str) and raw.strip() and "\x00" not in raw or isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    raise InputError(path, None, f"{what}: {raw!r} is not an item id (a non-empty string or an integer)", where)


def _check_text(fields: Any, spec: TaskSpec, item_id: str, items: Mapping[str, Mapping[str, str]] | None,
                path: str, where: str) -> dict[str, str]:
    """The item's input fields found in FIELDS, each checked as text (as any input file's are); with
    ITEMS (the file annotate read), they must be that item's texts, and the rest come from there."""
    if not isinstance(fields, dict):
        raise InputError(path, None, f"must be an object of the item's fields, got {type(fields).__name__}", where,
                         item_id)
    got = {f.name: text_value(fields[f.name], path, None, f"{where}.{f.name}", item_id)
           for f in spec.inputs if f.name in fields}
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
    """A whole JSON file (a UTF-8 byte order mark is allowed, as the JSONL and CSV readers allow it)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(str(path), None, f"is not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file "
                                          f"as UTF-8") from None
    try:
        return loads(text)
    except JSONError as e:
        raise InputError(str(path), None, f"not JSON: {e}") from None


def _rater(who: Any) -> str | None:
    """The annotator as Label Studio names them (completed_by: an id, or a user object), or None."""
    if isinstance(who, dict):
        who = who.get("email") or who.get("username") or who.get("id")
    if isinstance(who, str) and who.strip() or isinstance(who, int) and not isinstance(who, bool):
        return str(who)
    return None


def _record(item_id: str, fields: Mapping[str, str], rater: str | None, labels: Mapping[str, int | str]
            ) -> dict[str, Any]:
    """One human-label record; `rater` only where the tool named one."""
    return {"id": item_id, **fields, **({"rater": rater} if rater is not None else {}), "labels": dict(labels)}


def _list(v: Any, p: str, where: str, item_id: str | None, what: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise InputError(p, None, f"must be a list of {what}, got {type(v).__name__}", where, item_id)
    return v


def _obj(v: Any, p: str, where: str, item_id: str | None, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise InputError(p, None, f"must be {what}, got {type(v).__name__}", where, item_id)
    return v


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
    annotation) as human-label records; P names where they came from in errors. Every level of
    the JSON is type-checked: a wrong shape is an InputError naming its place ([i].annotations[j]...)."""
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
        assert isinstance(task, dict)
        item_id = _item_id(data["id"], p, f"{where}.data.id", "task")
        fields = _check_text(data, spec, item_id, items, p, f"{where}.data")
        anns = _list(task.get("annotations"), p, f"{where}.annotations", item_id, "annotations")
        counts["tasks_without_annotations"] += not anns
        for j, ann in enumerate(anns):
            at = f"{where}.annotations[{j}]"
            ann = _obj(ann, p, at, item_id, "an annotation object")
            counts["annotations"] += 1
            if ann.get("was_cancelled") is True:
                counts["cancelled"] += 1
                continue
            labels: dict[str, int | str] = {}
            for k, r in enumerate(_list(ann.get("result"), p, f"{at}.result", item_id, "results")):
                r = _obj(r, p, f"{at}.result[{k}]", item_id, "a result object")
                c = by_name.get(r["from_name"]) if isinstance(r.get("from_name"), str) else None
                if c is None:
                    continue
                vw = f"{at}.result[{k}].value"
                value = _obj(r.get("value") or {}, p, vw, item_id, "an object with 'rating' or 'choices'")
                if "rating" in value:
                    raw = value["rating"]
                else:
                    choices = _list(value.get("choices"), p, f"{vw}.choices", item_id, "choices")
                    raw = choices[0] if choices else None
                if raw is not None:
                    labels[c.name] = _level(c, raw, vw, item_id, p)
            if not labels:
                counts["without_labels"] += 1
                continue
            out.append(_record(item_id, fields, _rater(ann.get("completed_by")), labels))
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
    return records_from_argilla(recs, spec, items, p)


def records_from_argilla(recs: list[Any], spec: TaskSpec, items: Mapping[str, Mapping[str, str]] | None,
                         p: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Argilla records (already read) as human-label records; P names where they came from."""
    by_name = {c.name: c for c in spec.criteria}
    out: list[dict[str, Any]] = []
    counts = {"records_read": len(recs), "responses": 0, "records": 0, "discarded": 0, "without_labels": 0,
              "records_without_responses": 0}
    for i, rec in enumerate(recs):
        where = f"[{i}]"
        if not isinstance(rec, dict) or rec.get("id") in (None, ""):
            raise InputError(p, None, "record has no id (records made by annotate-cli convert carry the item's id)",
                             f"{where}.id")
        item_id = _item_id(rec["id"], p, f"{where}.id", "record")
        fields = _check_text(rec.get("fields") or {}, spec, item_id, items, p, f"{where}.fields")
        per_user: dict[str | None, dict[str, int | str]] = {}
        responses = _obj(rec.get("responses") or {}, p, f"{where}.responses", item_id,
                         "an object {question: [responses]}")
        counts["records_without_responses"] += not responses
        for q, answers in responses.items():
            c = by_name.get(q)
            for k, a in enumerate(_list(answers, p, f"{where}.responses.{q}", item_id, "responses")):
                at = f"{where}.responses.{q}[{k}]"
                a = _obj(a, p, at, item_id, "a response object")
                counts["responses"] += 1
                if a.get("status") in ("discarded", "draft") or a.get("value") is None:
                    counts["discarded"] += 1
                    continue
                if c is None:
                    continue
                user = _rater(a.get("user_id"))  # None: one record without a rater
                per_user.setdefault(user, {})[c.name] = _level(c, a["value"], at, item_id, p)
        if responses and not per_user:
            counts["without_labels"] += 1
        out.extend(_record(item_id, fields, user, labels) for user, labels in per_user.items())
    counts["records"] = len(out)
    return out, counts
