"""annotate-cli's output in the formats labelling tools import: Label Studio, Argilla 2.x, CSV.

    preds = read_predictions("labels.jsonl", spec)             # runtime/records.py
    inputs = read_inputs("items.jsonl", spec)                 # the texts, by id (optional)
    tasks = label_studio_tasks(preds, spec, inputs)           # + label_studio_config(spec)
    records = argilla_records(preds, spec, inputs, agent)     # + argilla_settings(spec)
    header, rows = csv_rows(preds, spec, inputs)

Every prediction record becomes exactly one task, record or row, error records included (flagged,
never dropped). Per criterion the tools get the label, for rating scales the score (the
probability-weighted mean of the levels), and the model's confidence (the chosen label's
probability); all probabilities travel with the item where the tool has no field for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from .data import InputError, check_item, iter_rows
from .records import Prediction
from .spec import Criterion, TaskSpec

ERROR_KEY = "edge_annotator_error"
PROBS_KEY = "edge_annotator"


def read_inputs(path: str | Path, spec: TaskSpec) -> dict[str, dict[str, str]]:
    """The items' input fields by id (the file annotate-cli read)."""
    return {it.id: it.fields for it in (check_item(r, spec) for r in iter_rows(path))}


def _fields(p: Prediction, spec: TaskSpec, inputs: dict[str, dict[str, str]] | None) -> dict[str, str]:
    if inputs is None:
        return {}
    if p.id not in inputs:
        raise InputError("predictions", p.line, f"id '{p.id}' is not in the items file given with --items",
                         "id", p.id)
    return dict(inputs[p.id])


def _numeric(c: Criterion) -> bool:
    return c.level != "nominal" and all(isinstance(v, (int, float)) for v in c.values)


def _value(p: Prediction, c: Criterion) -> Any:
    """A rating scale's number (the score where the record has one, else the label); a label set's label."""
    if _numeric(c):
        return p.scores.get(c.name, p.labels[c.name])
    return str(p.labels[c.name])


# -- Label Studio ------------------------------------------------------------------------------

def label_studio_config(spec: TaskSpec) -> str:
    """The labelling interface (<View> XML) the tasks' predictions belong to: each input as a
    <Text>, each label set as <Choices>, each rating scale as a <Number> over its levels' range."""
    first = spec.inputs[0].name
    lines = ["<View>"]
    for f in spec.inputs:
        lines.append(f"  <Header value={quoteattr(f.title)}/>")
        lines.append(f"  <Text name={quoteattr(f.name)} value={quoteattr('$' + f.name)}/>")
    for c in spec.criteria:
        lines.append(f"  <Header value={quoteattr(c.name)}/>")
        if _numeric(c):
            vals = [float(v) for v in c.values]
            lo, hi = quoteattr(f"{min(vals):g}"), quoteattr(f"{max(vals):g}")
            lines.append(f"  <Number name={quoteattr(c.name)} toName={quoteattr(first)} min={lo} max={hi} "
                         f"step=\"0.01\"/>")
        else:
            lines.append(f"  <Choices name={quoteattr(c.name)} toName={quoteattr(first)} choice=\"single\" "
                         f"showInline=\"true\">")
            lines.extend(f"    <Choice value={quoteattr(str(v))}/>" for v in c.values)
            lines.append("  </Choices>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"


def label_studio_tasks(preds: list[Prediction], spec: TaskSpec,
                       inputs: dict[str, dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """Tasks to import (Label Studio's "import pre-annotated data"): `data` holds the inputs, the id
    and, under "edge_annotator", every level's probability and the scores; one prediction per task
    whose `result` has one region per criterion, `model_version` the model file's sha256 prefix and
    `score` the mean confidence. An error record is a task with no prediction and the error in data."""
    first = spec.inputs[0].name
    tasks: list[dict[str, Any]] = []
    for p in preds:
        data: dict[str, Any] = {**_fields(p, spec, inputs), "id": p.id}
        if p.error is not None:
            data[ERROR_KEY] = p.error.get("message", "error")
            tasks.append({"data": data, "predictions": []})
            continue
        data[PROBS_KEY] = {"probs": p.probs, "scores": p.scores}
        result: list[dict[str, Any]] = []
        for c in spec.criteria:
            kind, key = ("number", "number") if _numeric(c) else ("choices", "choices")
            v = _value(p, c)
            result.append({"id": f"{p.id}-{c.name}", "from_name": c.name, "to_name": first, "type": kind,
                           "value": {key: v if kind == "number" else [v]}, "score": p.confidence(c.name)})
        score = sum(p.confidence(c.name) for c in spec.criteria) / len(spec.criteria)
        prediction: dict[str, Any] = {"model_version": p.model_sha256[:12], "score": score, "result": result}
        tasks.append({"data": data, "predictions": [prediction]})
    return tasks


# -- Argilla 2.x -------------------------------------------------------------------------------

def _rating_values(c: Criterion) -> list[int] | None:
    """Argilla's RatingQuestion takes whole numbers 0..10; other scales are label questions."""
    vals = c.values
    if c.level != "nominal" and all(isinstance(v, int) and 0 <= v <= 10 for v in vals):
        return [int(v) for v in vals]
    return None


def argilla_settings(spec: TaskSpec) -> dict[str, Any]:
    """The dataset settings as `rg.Settings` takes them: a TextField per input, a RatingQuestion
    per scale of whole numbers 0..10, a LabelQuestion otherwise; the error as metadata."""
    questions = []
    for c in spec.criteria:
        rating = _rating_values(c)
        if rating is not None:
            questions.append({"type": "rating", "name": c.name, "title": c.name, "values": rating})
        else:
            questions.append({"type": "label_selection", "name": c.name, "title": c.name,
                              "labels": [str(v) for v in c.values]})
    return {"fields": [{"type": "text", "name": f.name, "title": f.title} for f in spec.inputs],
            "questions": questions, "metadata": [{"type": "terms", "name": ERROR_KEY, "title": "annotate-cli error"}],
            "guidelines": spec.description or spec.name}


def argilla_records(preds: list[Prediction], spec: TaskSpec, inputs: dict[str, dict[str, str]] | None,
                    agent: str) -> list[dict[str, Any]]:
    """Records as `rg.Record` takes them: the inputs, one model suggestion per question (`value`,
    `score` the label's probability, `agent`, type "model"); an error record has no suggestions
    and its message as metadata."""
    out = []
    for p in preds:
        rec: dict[str, Any] = {"id": p.id, "fields": _fields(p, spec, inputs)}
        if p.error is not None:
            rec["metadata"] = {ERROR_KEY: p.error.get("message", "error")}
            rec["suggestions"] = []
            out.append(rec)
            continue
        rec["suggestions"] = [
            {"question_name": c.name,
             "value": int(p.labels[c.name]) if _rating_values(c) is not None else str(p.labels[c.name]),
             "score": p.confidence(c.name), "agent": agent, "type": "model"} for c in spec.criteria]
        out.append(rec)
    return out


# -- CSV ---------------------------------------------------------------------------------------

def csv_rows(preds: list[Prediction], spec: TaskSpec,
             inputs: dict[str, dict[str, str]] | None = None) -> tuple[list[str], list[list[Any]]]:
    """One row per record: id, the inputs (with --items), per criterion its label, score and the
    label's probability, and an error column (empty, or the error record's message)."""
    header = ["id"] + ([f.name for f in spec.inputs] if inputs is not None else [])
    for c in spec.criteria:
        header += [f"{c.name}_label", f"{c.name}_score", f"{c.name}_p_max"]
    header.append("error")
    rows = []
    for p in preds:
        fields = _fields(p, spec, inputs)
        row: list[Any] = [p.id] + ([fields[f.name] for f in spec.inputs] if inputs is not None else [])
        for c in spec.criteria:
            if p.error is not None:
                row += ["", "", ""]
            else:
                score = p.scores.get(c.name)
                row += [p.labels[c.name], "" if score is None else score, p.confidence(c.name)]
        row.append("" if p.error is None else p.error.get("message", "error"))
        rows.append(row)
    return header, rows
