"""A real Label Studio server takes annotate-cli convert's tasks: `make label-studio-check`.

    python scripts/label_studio_check.py LABEL_STUDIO_EXE TASKS.json CONFIG.xml --spec S --export OUT.json

Starts `label-studio` (its own virtualenv: its pins clash with the project's) on a free local port
with a throw-away data folder and user, creates a project with CONFIG.xml through the API, imports
TASKS.json, reads every task and its predictions back, and checks: as many tasks and predictions
as were sent, and each prediction's result as sent. Then the labels back: it annotates 5 tasks
through the API as an expert correcting the model would (each criterion one level up where it
can), cancels a 6th, exports the project as JSON (OUT.json) and reads that with `annotate-cli data
import`'s reader (runtime/feedback.py): 5 ratings with the corrected levels, 1 cancelled.

With --backend MODEL: `annotate-cli serve MODEL` as the ML backend of a second project. Label
Studio is told of it through its API (/api/ml), 20 of the tasks are imported without predictions,
Label Studio is asked for predictions ("Retrieve predictions", /api/dm/actions), and the 20 it
stores must equal TASKS' (annotate + convert of the same items with the same file). Then 5 of them
are annotated and the backend's webhook must have written them to its --labels-out file.

Prints one JSON line; exits 1 on a difference. Only this machine's loopback interface is used.
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


BACKEND_TASKS = 20


def _wait(url: str, proc: subprocess.Popen[bytes], what: str, log_path: Path) -> None:
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited ({proc.returncode}):\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
    raise SystemExit(f"{what} did not answer {url} in 300 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _backend_check(base: str, token: str, config: str, tasks: list[dict[str, Any]], spec: Any, model: str,
                   spec_path: str, work: Path) -> dict[str, Any]:
    """Label Studio's own ML backend client against annotate-cli serve: predictions asked for
    through its API, then annotations sent back through its webhook."""
    port = _free_port()
    labels_out = work / "webhook-labels.jsonl"
    log_path = work / "serve.log"
    cli = str(Path(sys.executable).with_name("annotate-cli"))
    with open(log_path, "w") as log:
        serve = subprocess.Popen([cli, "serve", model, "--spec", spec_path, "--port", str(port), "--workers", "2",
                                  "--labels-out", str(labels_out)], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(url + "/health", serve, "annotate-cli serve", log_path)
            pid = _api(base, token, "POST", "/api/projects", {"title": "edge-annotator ML backend",
                                                              "label_config": config})["id"]
            names = [f.name for f in spec.inputs]
            plain = [{"data": {k: t["data"][k] for k in ["id", *names]}} for t in tasks[:BACKEND_TASKS]]
            _api(base, token, "POST", f"/api/projects/{pid}/import", plain)
            ml = _api(base, token, "POST", "/api/ml", {"url": url, "project": pid, "title": "edge-annotator"})
            t0 = time.perf_counter()
            _api(base, token, "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
                 {"selectedItems": {"all": True, "excluded": []}})
            seconds = time.perf_counter() - t0
            got = _api(base, token, "GET", f"/api/tasks?project={pid}&page_size=1000&fields=all")
            got = got["tasks"] if isinstance(got, dict) else got
            preds = {str(t["data"]["id"]): _api(base, token, "GET", f"/api/predictions?task={t['id']}") for t in got}
            want = {str(t["data"]["id"]): t["predictions"][0] for t in tasks[:BACKEND_TASKS]}
            same = sum(1 for i, w in want.items() if len(preds.get(i, [])) == 1
                       and preds[i][0]["result"] == w["result"] and preds[i][0]["model_version"] == w["model_version"]
                       and abs(float(preds[i][0]["score"]) - w["score"]) < 1e-9)
            for t in got[:CORRECTED]:
                result = _corrected(preds[str(t["data"]["id"])][0]["result"], spec)
                _api(base, token, "POST", f"/api/tasks/{t['id']}/annotations/", {"result": result})
            back = []
            for _ in range(40):  # the webhook may be sent after the API call returns
                back = labels_out.read_text().splitlines() if labels_out.exists() else []
                if len(back) >= CORRECTED:
                    break
                time.sleep(0.5)
            stats = json.loads(urllib.request.urlopen(url + "/stats", timeout=10).read())
        finally:
            _stop(serve)
    return {"ml_backend": ml.get("state"), "tasks": len(got), "predictions": sum(len(v) for v in preds.values()),
            "same_as_annotate": same, "retrieve_seconds": round(seconds, 1), "annotated": CORRECTED,
            "webhook_labels": len(back), "webhook_actions": stats.get("webhook_actions"),
            "backend_requests": stats.get("requests")}


def check(exe: str, tasks_path: str, config_path: str, spec_path: str, export_path: str,
          backend: str | None = None) -> int:
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
               "COLLECT_ANALYTICS": "false",
               # the ML backend (annotate-cli serve) listens on loopback, which Label Studio refuses by default
               "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false"}
        log = open(Path(data_dir) / "server.log", "w")
        server = subprocess.Popen([exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                                   "--data-dir", data_dir, "--username", "check@example.com",
                                   "--password", secrets.token_hex(12), "--user-token", token],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait(base + "/health", server, "label-studio", Path(data_dir) / "server.log")
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
            backend_out = _backend_check(base, token, config, tasks, spec, backend, spec_path, Path(data_dir)) \
                if backend else None
        finally:
            _stop(server)
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
    ok = (len(got) == len(tasks) and len(preds) == out["predictions_sent"] and same == len(tasks)
          and lb["records"] == lb["as_annotated"] == CORRECTED and lb["cancelled"] == 1)
    if backend_out is not None:
        out["backend"] = backend_out
        ok = ok and (backend_out["tasks"] == backend_out["predictions"] == backend_out["same_as_annotate"]
                     == BACKEND_TASKS and backend_out["webhook_labels"] == CORRECTED)
    print(json.dumps(out))
    return 0 if ok else 1


@click.command()
@click.argument("exe", type=click.Path(exists=True, dir_okay=False))
@click.argument("tasks", type=click.Path(exists=True, dir_okay=False))
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The spec TASKS were converted with.")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), required=True,
              help="Write the project's JSON export (after the annotations) here.")
@click.option("--backend", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Also run `annotate-cli serve BACKEND --spec SPEC` as a second project's ML backend "
                   "(TASKS must be annotate + convert's output with this very file).")
def main(exe: str, tasks: str, config: str, spec_path: str, export_path: str, backend: str | None) -> None:
    """Start the Label Studio server EXE, import TASKS (annotate-cli convert's JSON) into a project
    with label CONFIG (XML), read everything back and compare; annotate some, export, import the
    labels back; exit 1 on a difference.

    \b
    Examples:
      python scripts/label_studio_check.py .venv-labelstudio/bin/label-studio tasks.json config.xml \\
          --spec tasks/emobank.yaml --export export.json --backend models/gemma-3-270m-q4_k_m.gguf
    """
    sys.exit(check(exe, tasks, config, spec_path, export_path, backend))


if __name__ == "__main__":
    main()
