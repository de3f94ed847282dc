"""A real Label Studio server takes annotate-cli convert's tasks: `make label-studio-check`.

    python scripts/label_studio_check.py LABEL_STUDIO_EXE TASKS.json CONFIG.xml --spec S --export OUT.json

Starts `label-studio` (its own virtualenv: its pins clash with the project's) on a free local port
with a throw-away data folder and user, creates a project with CONFIG.xml through the API, imports
TASKS.json, reads every task and its predictions back, and checks: as many tasks and predictions
as were sent, and each prediction's result as sent. Then the labels back: it annotates 5 tasks
through the API as an expert correcting the model would (each criterion one level up where it
can), cancels a 6th, exports the project as JSON (OUT.json) and reads that with `annotate-cli data
import`'s reader (runtime/feedback.py): 5 ratings with the corrected levels, 1 cancelled. Prints
one JSON line; exits 1 on a difference. Only this machine's loopback interface is used.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Authorization": f"Token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode()
    return json.loads(text) if text else None


CORRECTED = 5


def _corrected(result: list[dict[str, Any]], spec: Any) -> list[dict[str, Any]]:
    """The prediction's result with each criterion one level up (the top level stays): an expert's edit."""
    by = {c.name: c for c in spec.criteria}
    out = []
    for r in result:
        c, v = by[r["from_name"]], dict(r["value"])
        if "rating" in v:
            v["rating"] = min(int(v["rating"]) + 1, len(c.values))
        else:
            names = [str(x) for x in c.values]
            v["choices"] = [names[min(names.index(v["choices"][0]) + 1, len(names) - 1)]]
        out.append({k: r[k] for k in ("from_name", "to_name", "type")} | {"value": v, "origin": "manual"})
    return out


def _level_of(value: dict[str, Any]) -> str:
    return str(value["rating"]) if "rating" in value else str(value["choices"][0])


def check(exe: str, tasks_path: str, config_path: str, spec_path: str, export_path: str) -> int:
    from edge_annotator.runtime.feedback import from_label_studio
    from edge_annotator.runtime.spec import load_spec

    spec = load_spec(spec_path)
    tasks = json.loads(Path(tasks_path).read_text())
    config = Path(config_path).read_text()
    port, token = _free_port(), secrets.token_hex(20)
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ls-check-") as data_dir:
        env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": data_dir, "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
               "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
               "COLLECT_ANALYTICS": "false"}
        log = open(Path(data_dir) / "server.log", "w")
        server = subprocess.Popen([exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                                   "--data-dir", data_dir, "--username", "check@example.com",
                                   "--password", secrets.token_hex(12), "--user-token", token],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if server.poll() is not None:
                        raise SystemExit(f"label-studio exited ({server.returncode}):\n"
                                         + (Path(data_dir) / "server.log").read_text()[-3000:])
                    time.sleep(0.5)
            started = time.perf_counter() - t0
            project = _api(base, token, "POST", "/api/projects", {"title": "edge-annotator check",
                                                                  "label_config": config})
            pid = project["id"]
            imported = _api(base, token, "POST", f"/api/projects/{pid}/import", tasks)
            got = _api(base, token, "GET", f"/api/tasks?project={pid}&page_size=10000&fields=all")
            got = got["tasks"] if isinstance(got, dict) else got
            preds = [p for t in got for p in _api(base, token, "GET", f"/api/predictions?task={t['id']}")]
            first = {p["task"]: p for p in reversed(preds)}
            labelled = [t for t in got if t["id"] in first][:CORRECTED + 1]
            want = {}
            for t in labelled[:CORRECTED]:
                result = _corrected(first[t["id"]]["result"], spec)
                _api(base, token, "POST", f"/api/tasks/{t['id']}/annotations/", {"result": result})
                want[str(t["data"]["id"])] = {r["from_name"]: _level_of(r["value"]) for r in result}
            _api(base, token, "POST", f"/api/tasks/{labelled[-1]['id']}/annotations/",
                 {"result": [], "was_cancelled": True})
            req = urllib.request.Request(f"{base}/api/projects/{pid}/export?exportType=JSON&download_all_tasks=true",
                                         headers={"Authorization": f"Token {token}"})
            with urllib.request.urlopen(req, timeout=120) as r:
                Path(export_path).write_bytes(r.read())
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    sent = {t["data"]["id"]: t["predictions"] for t in tasks}
    back = {t["data"]["id"]: t for t in got}
    by_task: dict[Any, list[dict[str, Any]]] = {}
    for p in preds:
        by_task.setdefault(p["task"], []).append(p)

    def results(ps: list[dict[str, Any]]) -> list[list[tuple[Any, Any]]]:
        return [[(r["from_name"], r["value"]) for r in p["result"]] for p in ps]

    same = sum(1 for i, ps in sent.items() if i in back and results(ps) == results(by_task.get(back[i]["id"], [])))
    out = {"server_start_s": round(started, 1), "seconds": round(time.perf_counter() - t0, 1),
           "tasks_sent": len(tasks), "tasks_read_back": len(got),
           "predictions_sent": sum(len(v) for v in sent.values()),
           "predictions_read_back": len(preds), "tasks_with_the_same_results": same,
           "import_response": {k: imported.get(k) for k in ("task_count", "prediction_count") if k in imported}}
    records, counts = from_label_studio(export_path, spec)
    back_labels = {r["id"]: {k: str(v) for k, v in r["labels"].items()} for r in records}
    predicted = {t["data"]["id"]: {r["from_name"]: _level_of(r["value"]) for r in t["predictions"][0]["result"]}
                 for t in tasks if t["predictions"]}
    lb = {"annotated": len(want), "records": len(records), "cancelled": counts["cancelled"],
          "as_annotated": sum(back_labels.get(i) == w for i, w in want.items()),
          "changed_from_the_prediction": sum(want[i] != predicted.get(i) for i in want)}
    out["labels_back"] = lb
    print(json.dumps(out))
    ok = (len(got) == len(tasks) and len(preds) == out["predictions_sent"] and same == len(tasks)
          and lb["records"] == lb["as_annotated"] == CORRECTED and lb["cancelled"] == 1)
    return 0 if ok else 1


@click.command()
@click.argument("exe", type=click.Path(exists=True, dir_okay=False))
@click.argument("tasks", type=click.Path(exists=True, dir_okay=False))
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The spec TASKS were converted with.")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), required=True,
              help="Write the project's JSON export (after the annotations) here.")
def main(exe: str, tasks: str, config: str, spec_path: str, export_path: str) -> None:
    """Start the Label Studio server EXE, import TASKS (annotate-cli convert's JSON) into a project
    with label CONFIG (XML), read everything back and compare; annotate some, export, import the
    labels back; exit 1 on a difference.

    \b
    Examples:
      python scripts/label_studio_check.py .venv-labelstudio/bin/label-studio tasks.json config.xml \\
          --spec tasks/emobank.yaml --export export.json
    """
    sys.exit(check(exe, tasks, config, spec_path, export_path))


if __name__ == "__main__":
    main()
