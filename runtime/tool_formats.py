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


# -- Label Studio ------------------------------------------------------------------------------

REVIEW_KEY = "edge_annotator_review"
"""Where a trust rule marks the labels: Argilla metadata naming the criteria whose label the rule did
not accept ("none": every label accepted), and Label Studio's read-only text control that says so."""
MODEL_KEY = "edge_annotator_model"
"""Task data: the model's labels, scores and confidences in words, shown above the controls."""


def _ls_rating(c: Criterion) -> int | None:
    """maxRating where a scale is 1..N whole numbers with N <= 10 (Label Studio's <Rating>), else None."""
    vals = c.values
    if c.level != "nominal" and vals == list(range(1, len(vals) + 1)) and len(vals) <= 10:
        return len(vals)
    return None


def has_trust_rule(spec: TaskSpec) -> bool:
    """Whether any criterion carries a trust rule (annotate then marks its labels accepted or not)."""
    return any(c.trust for c in spec.criteria)


def review_text(p: Prediction, spec: TaskSpec) -> str:
    """The trust rule's verdict in words: "to review: Arousal, Dominance" or "accepted: every label"."""
    todo = [c.name for c in spec.criteria if not p.accepted(c.name)]
    return f"to review: {', '.join(todo)}" if todo else "accepted: every label"


def label_studio_config(spec: TaskSpec) -> str:
    """The labelling interface (<View> XML) the tasks' predictions belong to: each input as a
    <Text>, the model's suggestion in words (a <Header> over task data), where a criterion carries a
    trust rule a read-only <TextArea> the predictions fill with the rule's verdict, and per criterion a
    <Rating> (whole-number 1..N scales, N <= 10) or <Choices> of its levels (label sets and other
    scales), pointed at the field the criterion judges (the spec's `judges`, else the last input)."""
    lines = ["<View>"]
    for f in spec.inputs:
        lines.append(f"  <Header value={quoteattr(f.title)}/>")
        lines.append(f"  <Text name={quoteattr(f.name)} value={quoteattr('$' + f.name)}/>")
    lines.append('  <Header value="The annotator suggests" size="5"/>')
    lines.append(f"  <Header value={quoteattr('$' + MODEL_KEY)} size=\"6\"/>")
    if has_trust_rule(spec):  # the predictions say which labels the rule left for review
        lines.append(f"  <TextArea name={quoteattr(REVIEW_KEY)} toName={quoteattr(spec.inputs[-1].name)} "
                     'rows="1" editable="false" placeholder="the trust rule: accepted, or to review"/>')
    for c in spec.criteria:
        to = quoteattr(spec.judged_field(c))
        lines.append(f"  <Header value={quoteattr(c.name + (': ' + c.description if c.description else ''))}/>")
        if (n := _ls_rating(c)) is not None:
            lines.append(f"  <Rating name={quoteattr(c.name)} toName={to} maxRating=\"{n}\" icon=\"star\"/>")
        else:
            lines.append(f"  <Choices name={quoteattr(c.name)} toName={to} choice=\"single\" showInline=\"true\">")
            lines.extend(f"    <Choice value={quoteattr(str(lv.value))}"
                         + (f" hint={quoteattr(lv.anchor)}" if lv.anchor else "") + "/>" for lv in c.scale)
            lines.append("  </Choices>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"


def _suggestion_text(p: Prediction, spec: TaskSpec) -> str:
    """E.g. "Valence 4 (score 3.91, p 0.60); Arousal 3 (score 3.02, p 0.71)"; with a trust rule's
    marks, each label says "accepted" or "to review", a score its interval ("score 3.91 in
    [3.40, 4.43]") and a label its set ("one of joy, love")."""
    parts = []
    for c in spec.criteria:
        score = p.scores.get(c.name)
        span = f" in [{p.intervals[c.name][0]:.2f}, {p.intervals[c.name][1]:.2f}]" if c.name in p.intervals else ""
        extra = f"score {score:.2f}{span}, " if score is not None else ""
        mark = "" if c.name not in p.accept else ", accepted" if p.accept[c.name] else ", to review"
        among = f", one of {', '.join(map(str, p.sets[c.name]))}" if len(p.sets.get(c.name, ())) > 1 else ""
        parts.append(f"{c.name} {p.labels[c.name]} ({extra}p {p.confidence(c.name):.2f}{mark}{among})")
    return "; ".join(parts)


def label_studio_tasks(preds: list[Prediction], spec: TaskSpec, inputs: dict[str, dict[str, str]] | None = None,
                       accepted_only: bool = False) -> list[dict[str, Any]]:
    """Tasks to import (Label Studio's "import pre-annotated data"): `data` holds the inputs, the id,
    the suggestion in words and, under "edge_annotator", every level's probability and the scores;
    one prediction per task whose `result` pre-selects each criterion's label (a rating or a choice),
    `model_version` the model file's sha256 prefix and `score` the mean confidence. An error record
    is a task with no prediction and the error in data. ACCEPTED_ONLY: pre-select only the labels a
    trust rule accepted (the rest are left for the expert)."""
    tasks: list[dict[str, Any]] = []
    review = has_trust_rule(spec)  # label_studio_config then has the review control
    for p in preds:
        data: dict[str, Any] = {**_fields(p, spec, inputs), "id": p.id}
        if p.error is not None:
            data[ERROR_KEY] = p.error.get("message", "error")
            data[MODEL_KEY] = f"no suggestion: {data[ERROR_KEY]}"
            tasks.append({"data": data, "predictions": []})
            continue
        data[PROBS_KEY] = {"probs": p.probs, "scores": p.scores}
        data[MODEL_KEY] = _suggestion_text(p, spec)
        tasks.append({"data": data, "predictions": [label_studio_prediction(p, spec, accepted_only, review)]})
    return tasks


def label_studio_prediction(p: Prediction, spec: TaskSpec, accepted_only: bool = False,
                            review: bool = False) -> dict[str, Any]:
    """One result record's Label Studio prediction: `result` pre-selects each criterion's label (a
    rating or a choice, with its confidence as `score`; with ACCEPTED_ONLY only the labels a trust
    rule accepted), `model_version` is the model file's sha256 prefix and `score` the mean
    confidence (annotate-cli serve answers /predict with these). Where the record carries a trust
    rule's marks, `score` is the share of its labels the rule accepted instead (1.0: nothing to
    review; Label Studio's Data Manager sorts and filters tasks by it), and with REVIEW (the
    project's interface has label_studio_config's review control) the result says which to review."""
    result: list[dict[str, Any]] = []
    for c in spec.criteria:
        if accepted_only and not p.accepted(c.name):
            continue
        value: dict[str, Any]
        if _ls_rating(c) is not None:
            kind, value = "rating", {"rating": int(p.labels[c.name])}
        else:
            kind, value = "choices", {"choices": [str(p.labels[c.name])]}
        result.append({"id": f"{p.id}-{c.name}", "from_name": c.name, "to_name": spec.judged_field(c),
                       "type": kind, "value": value, "score": p.confidence(c.name)})
    if p.accept:
        score = sum(p.accepted(c.name) for c in spec.criteria) / len(spec.criteria)
        if review:
            result.append({"id": f"{p.id}-{REVIEW_KEY}", "from_name": REVIEW_KEY, "to_name": spec.inputs[-1].name,
                           "type": "textarea", "value": {"text": [review_text(p, spec)]}})
    else:
        score = sum(p.confidence(c.name) for c in spec.criteria) / len(spec.criteria)
    return {"model_version": p.model_sha256[:12], "score": score, "result": result}


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
    metadata = [{"type": "terms", "name": ERROR_KEY, "title": "annotate-cli error"}]
    if has_trust_rule(spec):
        metadata.append({"type": "terms", "name": REVIEW_KEY, "title": "annotate-cli: labels to review"})
    return {"fields": [{"type": "text", "name": f.name, "title": f.title} for f in spec.inputs],
            "questions": questions, "metadata": metadata, "guidelines": spec.description or spec.name}


def argilla_records(preds: list[Prediction], spec: TaskSpec, inputs: dict[str, dict[str, str]] | None,
                    agent: str, accepted_only: bool = False) -> list[dict[str, Any]]:
    """Records as `rg.Record` takes them: the inputs, one model suggestion per question (`value`,
    `score` the label's probability, `agent`, type "model"; with ACCEPTED_ONLY only for the labels
    a trust rule accepted); an error record has no suggestions and its message as metadata. Where
    the records carry a trust rule's marks, metadata names the criteria to review."""
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
             "score": p.confidence(c.name), "agent": agent, "type": "model"} for c in spec.criteria
            if not accepted_only or p.accepted(c.name)]
        if p.accept:
            rec["metadata"] = {REVIEW_KEY: [c.name for c in spec.criteria if not p.accepted(c.name)] or "none"}
        out.append(rec)
    return out


# -- CSV ---------------------------------------------------------------------------------------

def csv_rows(preds: list[Prediction], spec: TaskSpec,
             inputs: dict[str, dict[str, str]] | None = None) -> tuple[list[str], list[list[Any]]]:
    """One row per record: id, the inputs (with --items), per criterion its label, score and the
    label's probability (and, where the records carry a trust rule's marks, whether it accepted the
    label: true or false, the score interval's ends or the label set, joined by "|", where they
    carry one), and an error column (empty, or the error record's message)."""
    header = ["id"] + ([f.name for f in spec.inputs] if inputs is not None else [])
    marked = [c.name for c in spec.criteria if any(c.name in p.accept for p in preds)]
    spans = [c.name for c in spec.criteria if any(c.name in p.intervals for p in preds)]
    sets = [c.name for c in spec.criteria if any(c.name in p.sets for p in preds)]
    for c in spec.criteria:
        header += [f"{c.name}_label", f"{c.name}_score", f"{c.name}_p_max"]
        header += [f"{c.name}_accept"] if c.name in marked else []
        header += [f"{c.name}_low", f"{c.name}_high"] if c.name in spans else []
        header += [f"{c.name}_set"] if c.name in sets else []
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
            if c.name in marked:
                row.append("" if c.name not in p.accept else str(p.accept[c.name]).lower())
            if c.name in spans:
                row += list(p.intervals.get(c.name, ("", "")))
            if c.name in sets:
                row.append("|".join(map(str, p.sets.get(c.name, ()))))
        row.append("" if p.error is None else p.error.get("message", "error"))
        rows.append(row)
    return header, rows
