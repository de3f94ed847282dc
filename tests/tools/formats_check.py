"""Checks the labelling tools' own SDKs make of annotate-cli convert's output. Runs in the
virtualenv `make formats-venv` builds (label-studio-sdk and argilla pin numpy and friends apart
from the project's), called by tests/test_convert.py:

    .venv-formats/bin/python tests/tools/formats_check.py label-studio CONFIG.xml TASKS.json
    .venv-formats/bin/python tests/tools/formats_check.py argilla SETTINGS.json RECORDS.json
    .venv-formats/bin/python tests/tools/formats_check.py argilla-responses RECORDS.json PLAN.json

Prints one JSON line: what the SDK parsed, and how many predictions or suggestions it found invalid;
argilla-responses: the records with the experts' responses of PLAN ({id: [{user, values: {question:
value}}]}), built as rg.Record and rg.Response and serialised by the SDK (`Record.to_dict()`).
"""

import json
import sys


def label_studio(config_path: str, tasks_path: str) -> dict:
    from label_studio_sdk.label_interface import LabelInterface

    li = LabelInterface(open(config_path).read())
    tasks = json.load(open(tasks_path))
    invalid = sum(not li.validate_prediction(p) for t in tasks for p in t["predictions"])
    return {"controls": [c.name for c in li.controls], "objects": [o.name for o in li.objects], "tasks": len(tasks),
            "predictions": sum(len(t["predictions"]) for t in tasks), "invalid": invalid}


def argilla(settings_path: str, records_path: str) -> dict:
    import argilla as rg

    class OfflineArgilla(rg.Argilla):
        """The SDK's own client without its connection check: building settings and records sends nothing."""

        def _validate_connection(self) -> None:
            pass

    client = OfflineArgilla(api_url="http://127.0.0.1:9", api_key="offline")
    settings, records = json.load(open(settings_path)), json.load(open(records_path))
    fields = [rg.TextField(name=f["name"], title=f["title"], client=client) for f in settings["fields"]]
    qs = [rg.RatingQuestion(name=q["name"], title=q["title"], values=q["values"], client=client)
          if q["type"] == "rating" else
          rg.LabelQuestion(name=q["name"], title=q["title"], labels=q["labels"], client=client)
          for q in settings["questions"]]
    meta = [rg.TermsMetadataProperty(name=m["name"], title=m["title"], client=client) for m in settings["metadata"]]
    s = rg.Settings(fields=fields, questions=qs, metadata=meta, guidelines=settings["guidelines"])
    s.validate()
    allowed = {q.name: set(q.values if isinstance(q, rg.RatingQuestion) else q.labels) for q in qs}
    invalid = suggestions = 0
    for r in records:
        rec = rg.Record(id=r["id"], fields=r["fields"], metadata=r.get("metadata") or {},
                        suggestions=[rg.Suggestion(question_name=x["question_name"], value=x["value"], score=x["score"],
                                                   agent=x["agent"], type=x["type"]) for x in r["suggestions"]])
        for sg in rec.suggestions:
            suggestions += 1
            invalid += sg.value not in allowed[sg.question_name] or not 0 <= sg.score <= 1 or sg.type != "model"
        invalid += bool(set(rec.fields.keys()) - {f.name for f in fields})
    return {"questions": {q.name: type(q).__name__ for q in qs}, "records": len(records), "suggestions": suggestions,
            "invalid": invalid}


def argilla_responses(records_path: str, plan_path: str) -> list:
    import uuid

    import argilla as rg

    plan = json.load(open(plan_path))
    out = []
    for r in json.load(open(records_path)):
        responses = [rg.Response(question_name=q, value=v, user_id=uuid.UUID(who["user"]))
                     for who in plan.get(r["id"], []) for q, v in who["values"].items()]
        out.append(rg.Record(id=r["id"], fields=r["fields"], responses=responses).to_dict())
    return out


if __name__ == "__main__":
    kind, a, b = sys.argv[1:4]
    if kind == "argilla-responses":
        print(json.dumps(argilla_responses(a, b)))
    else:
        print(json.dumps(label_studio(a, b) if kind == "label-studio" else argilla(a, b)))
