"""`annotate-cli serve`: an annotator as a Label Studio ML backend (FastAPI on uvicorn).

    annotate-cli serve annotator.gguf --port 9090
    # Label Studio: project > Settings > Model > Connect Model, URL http://127.0.0.1:9090

The routes of Label Studio's ML backend protocol (what `label_studio/ml/api_connector.py` sends):

    GET  /health    {"status": "UP", "model_class": "edge-annotator", "model_version": ...}
    POST /setup     {"project", "schema", ...} -> {"model_version"}; 422 when the project's labelling
                    interface has no control for one of the spec's criteria
    POST /predict   {"tasks": [{"id", "data": {...}}, ...]} -> {"results": [one per task]}
    POST /webhook   Label Studio's events: counted by action; with --labels-out, each new or
                    updated annotation is appended there as a human-label record (`train` reads it)

A task's prediction is the one `annotate-cli convert --to label-studio` makes of `annotate`'s record
for the same item: the same labels, scores, confidences and `model_version` (the file's sha256
prefix). Items are scored one at a time (batch 1, annotate's default) by `--workers` threads, each
with its own llama.cpp context over the one loaded model, so a prediction does not depend on the
requests around it. At most `--queue` items wait; past that a request gets 503 with Retry-After.
A task the spec cannot read (a field missing, empty, too long) gets `{"error": ...}` in its place of
`results` (Label Studio keeps the other tasks' predictions); a request no task of which can be
read gets 422, one that is not JSON 400, one over --max-body bytes 413.

With --retrain-after N (and --labels-out, --spec), every N new labels start --retrain-command
(default `annotate-cli fit SPEC LABELS -o OUT`, which publishes only a file that passed parity) in
the background on --retrain-with's labels plus the new ones; the old model answers until the
command exits 0 with its file written, then the new one does (/health and /stats say which).

Listens on 127.0.0.1 unless --host says otherwise; another address needs --token, which every
request must then carry (`Authorization: Bearer TOKEN`, or HTTP basic auth with TOKEN as the
password, as Label Studio's "Basic auth" sends it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .annotator import Annotator, check_context
from .convert import label_studio_prediction
from .data import InputError, Item, Row, check_item
from .engine import ContextOverflow, LlamaEngine, default_threads
from .jobs import overflow_error
from .records import Prediction, jsonl_line, result_record
from .spec import TaskSpec

log = logging.getLogger(__name__)

MODEL_CLASS = "edge-annotator"
DEFAULT_RETRAIN = "annotate-cli fit {spec} {labels} -o {output}"
"""--retrain-command's default: fit publishes its file only after parity passes (train/fit.py)."""


@dataclass
class ServeOptions:
    spec: Path | None = None
    threads: int | None = None
    workers: int = 2
    n_ctx: int = 2048
    gpu_layers: int = 0
    max_chars: int | None = None
    queue: int = 1024
    max_body: int = 32 << 20
    token: str | None = None
    labels_out: Path | None = None
    retrain_after: int | None = None
    retrain_with: Path | None = None
    retrain_command: str = DEFAULT_RETRAIN
    retrain_dir: Path | None = None


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    predicted: int = 0
    task_errors: int = 0
    rejected_busy: int = 0
    webhook_actions: Counter[str] = field(default_factory=Counter)
    labels_written: int = 0


class Scorer:
    """The loaded model and `workers` threads, each with its own context and Annotator (batch 1)."""

    def __init__(self, model_path: Path, opts: ServeOptions):
        from .gguf_meta import sha256_file
        from .jobs import open_model

        self.path = Path(model_path)
        self.llm, self.spec = open_model(model_path, opts.spec, opts.gpu_layers)
        try:
            check_context(self.llm.tokenize, self.spec, self.llm.window(opts.n_ctx))  # each worker's window
            self.sha256 = sha256_file(model_path)
        except BaseException:
            self.llm.close()
            raise
        self.model_version = self.sha256[:12]
        self.opts = opts
        per_worker = max(1, (opts.threads or default_threads()) // opts.workers)
        self._local = threading.local()
        self._engines: list[LlamaEngine] = []
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(opts.workers, thread_name_prefix="annotate",
                                       initializer=self._init_worker, initargs=(per_worker,))
        # every worker's context made now (the barrier holds each thread until all exist), so the
        # first request does not pay for it and a model that cannot make one fails at start
        barrier = threading.Barrier(opts.workers)
        try:
            list(self.pool.map(lambda _: barrier.wait(timeout=600), range(opts.workers)))
        except BaseException:
            self.close()
            raise

    def _init_worker(self, threads: int) -> None:
        eng = LlamaEngine(self.llm, n_ctx=self.opts.n_ctx, n_threads=threads)
        with self._lock:
            self._engines.append(eng)
        self._local.annotator = Annotator(eng, self.spec, batch=1)

    def _annotator(self) -> Annotator:
        return self._local.annotator  # type: ignore[no-any-return]

    def score(self, fields: dict[str, str]) -> Any:
        return self._annotator().score_many([fields])[0]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for eng in self._engines:
            eng.close()
        self.llm.close()


def task_fields(task: Any, i: int, spec: TaskSpec, max_chars: int | None) -> tuple[str, dict[str, str]]:
    """A Label Studio task's item id (data.id, as annotate-cli convert's tasks carry it, else the
    task's id) and its spec fields; InputError naming `tasks[i]` and the field otherwise."""
    where = "request"
    if not isinstance(task, dict):
        raise InputError(where, None, f"must be an object with 'data', got {type(task).__name__}", f"tasks[{i}]")
    data = task.get("data")
    if not isinstance(data, dict):
        raise InputError(where, None, "must be an object of the task's fields", f"tasks[{i}].data",
                         None if task.get("id") is None else str(task.get("id")))
    raw_id = data.get("id", task.get("id"))
    item_id = str(raw_id) if raw_id is not None else f"tasks[{i}]"
    try:
        item = check_item(Row(where, i, {**data, "id": item_id}), spec, max_chars=max_chars)
    except InputError as e:
        raise InputError(where, None, e.reason, f"tasks[{i}].data.{e.field}" if e.field else f"tasks[{i}]",
                         item_id) from None
    return item.id, item.fields


def prediction(item_id: str, scores: Any, spec: TaskSpec, sha256: str) -> dict[str, Any]:
    """The Label Studio prediction annotate-cli convert makes of annotate's record for this item:
    the record is written and read back as annotate writes it, so the two agree to the byte."""
    rec = json.loads(jsonl_line(result_record(item_id, scores, {"model_sha256": sha256,
                                                                "spec_sha256": spec.sha256})))
    p = Prediction(item_id, 0, rec["labels"], rec.get("scores") or {}, rec["probs"], sha256)
    return label_studio_prediction(p, spec)


def schema_controls(schema: str) -> set[str]:
    """The names of a labelling interface's controls (elements with name and toName)."""
    root = ElementTree.fromstring(schema)
    return {el.attrib["name"] for el in root.iter() if "name" in el.attrib and "toName" in el.attrib}


def _error(status: int, message: str, **extra: Any) -> Any:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _authorized(header: str | None, token: str) -> bool:
    if not header:
        return False
    kind, _, value = header.partition(" ")
    if kind.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if kind.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


def make_app(scorer: Scorer) -> Any:
    """The FastAPI application over a Scorer (its workers, bounded queue, stats)."""
    opts, spec = scorer.opts, scorer.spec
    app = FastAPI(title="edge-annotator", version=scorer.model_version, docs_url=None, redoc_url=None,
                  openapi_url=None)
    stats = Stats()
    pending = {"items": 0}
    labels_lock = threading.Lock()
    app.state.stats, app.state.scorer = stats, scorer
    retrainer = Retrainer(app, opts) if opts.retrain_after else None
    app.state.retrainer = retrainer

    def current() -> Scorer:
        return app.state.scorer  # type: ignore[no-any-return]

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        stats.requests[request.url.path] += 1
        if opts.token is not None and not _authorized(request.headers.get("authorization"), opts.token):
            return _error(401, "this server needs its token: Authorization: Bearer TOKEN, or basic auth with "
                               "TOKEN as the password")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > opts.max_body:
            return _error(413, f"request body of {size} bytes is over --max-body {opts.max_body}")
        return await call_next(request)

    async def read_json(request: Request) -> tuple[Any, Any]:
        """The body parsed, and None; or None and the error response to send."""
        body = await request.body()
        if len(body) > opts.max_body:
            return None, _error(413, f"request body of {len(body)} bytes is over --max-body {opts.max_body}")
        try:
            return (json.loads(body) if body else {}), None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, _error(400, f"the request body is not JSON: {e}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": current().model_version,
                "model": current().path.name, "spec": spec.name, "criteria": [c.name for c in spec.criteria],
                "workers": opts.workers, "pending": pending["items"], "predicted": stats.predicted}

    @app.get("/")
    async def index() -> dict[str, Any]:
        return await health()

    @app.post("/setup")
    async def setup(request: Request) -> Any:
        body, refused = await read_json(request)
        if refused is not None:
            return refused
        schema = body.get("schema") if isinstance(body, dict) else None
        if isinstance(schema, str) and schema.strip():
            try:
                names = schema_controls(schema)
            except ElementTree.ParseError as e:
                return _error(422, f"the project's labelling interface is not XML: {e}")
            missing = [c.name for c in spec.criteria if c.name not in names]
            if missing:
                return _error(422, f"the project's labelling interface has no control named "
                                   f"{', '.join(missing)} (spec '{spec.name}' needs one per criterion: "
                                   f"{', '.join(c.name for c in spec.criteria)}); make the project with "
                                   f"annotate-cli convert --label-config")
        return {"model_version": current().model_version}

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        body, refused = await read_json(request)
        if refused is not None:
            return refused
        tasks = body.get("tasks") if isinstance(body, dict) else None
        if not isinstance(tasks, list) or not tasks:
            return _error(422, "the request needs 'tasks': a non-empty list of Label Studio tasks "
                               "({'id': ..., 'data': {field: text}})")
        if pending["items"] + len(tasks) > opts.queue:
            stats.rejected_busy += 1
            return JSONResponse({"error": f"busy: {pending['items']} items are waiting (--queue {opts.queue}); "
                                          "retry"}, status_code=503, headers={"Retry-After": "1"})
        read: list[tuple[str, dict[str, str]] | InputError] = []
        for i, t in enumerate(tasks):
            try:
                read.append(task_fields(t, i, spec, opts.max_chars))
            except InputError as e:
                read.append(e)
        todo = [r for r in read if not isinstance(r, InputError)]
        if not todo:
            errs = [_task_error(e) for e in read if isinstance(e, InputError)]
            stats.task_errors += len(errs)
            return _error(422, f"no task of {len(tasks)} can be read with spec '{spec.name}' "
                               f"(fields {', '.join(spec.input_names)})", errors=errs)
        loop = asyncio.get_running_loop()
        pending["items"] += len(todo)
        scorer = current()  # this request's model, from here to its answer (a retrain may swap it)
        try:
            futures = [loop.run_in_executor(scorer.pool, scorer.score, fields) for _, fields in todo]
            scored = await asyncio.gather(*futures)
        finally:
            pending["items"] -= len(todo)
        it = iter(zip(todo, scored))
        results: list[dict[str, Any]] = []
        for r in read:
            if isinstance(r, InputError):
                results.append({"error": _task_error(r)})
                stats.task_errors += 1
                continue
            (item_id, fields), res = next(it)
            if isinstance(res, ContextOverflow):
                results.append({"error": _task_error(overflow_error(Item(item_id, fields, "request", 0), res))})
                stats.task_errors += 1
                continue
            results.append(prediction(item_id, res, spec, scorer.sha256))
            stats.predicted += 1
        return {"results": results, "model_version": scorer.model_version}

    @app.post("/webhook")
    async def webhook(request: Request) -> Any:
        body, refused = await read_json(request)
        if refused is not None:
            return refused
        if not isinstance(body, dict):
            return _error(422, "a Label Studio webhook event is a JSON object with 'action'")
        action = str(body.get("action", "?"))
        stats.webhook_actions[action] += 1
        written = 0
        if opts.labels_out is not None and action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            written = _write_labels(body, spec, opts.labels_out, labels_lock)
            stats.labels_written += written
            if retrainer is not None and written:
                retrainer.add(written, asyncio.get_running_loop())
        return {"status": "ok", "action": action, "labels_written": written,
                "counts": dict(stats.webhook_actions)}

    @app.get("/stats")
    async def get_stats() -> dict[str, Any]:
        return {"requests": dict(stats.requests), "predicted": stats.predicted, "task_errors": stats.task_errors,
                "rejected_busy": stats.rejected_busy, "pending": pending["items"],
                "webhook_actions": dict(stats.webhook_actions), "labels_written": stats.labels_written,
                "model_version": current().model_version,
                "retrain": retrainer.status() if retrainer is not None else None}

    return app


def _task_error(e: InputError) -> dict[str, Any]:
    return {"task": e.item_id, "field": e.field, "message": e.reason}


def _write_labels(event: dict[str, Any], spec: TaskSpec, out: Path, lock: threading.Lock) -> int:
    """An ANNOTATION_CREATED/UPDATED event's annotation as human-label records appended to OUT
    (runtime/feedback.py reads it as it reads an export: a cancelled one writes nothing)."""
    from .feedback import records_from_tasks

    task, ann = event.get("task"), event.get("annotation")
    if not isinstance(task, dict) or not isinstance(ann, dict):
        return 0
    try:
        records, _ = records_from_tasks([{**task, "annotations": [ann]}], spec, None, "webhook")
    except InputError as e:
        log.warning("webhook: annotation not written: %s", e)
        return 0
    with lock, out.open("a", encoding="utf-8") as fh:
        for r in records:
            fh.write(jsonl_line(r))
        fh.flush()
    return len(records)


class Retrainer:
    """--retrain-after N: after every N new labels from the webhook, --retrain-command in the
    background on the earlier labels (--retrain-with) plus the new ones; when it exits 0 and its
    output exists, the server loads that file and answers with it from the next request on. The
    old model serves until then (and finishes what it was given); a failed round keeps it."""

    def __init__(self, app: Any, opts: ServeOptions):
        assert opts.labels_out is not None and opts.retrain_after is not None and opts.spec is not None
        self.app, self.opts = app, opts
        self.dir = opts.retrain_dir or opts.labels_out.with_name(opts.labels_out.stem + "-retrain")
        self.new_labels = 0
        self.rounds: list[dict[str, Any]] = []
        self.running: threading.Thread | None = None
        self.lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"after": self.opts.retrain_after, "new_labels": self.new_labels,
                    "running": self.running is not None, "rounds": list(self.rounds)}

    def add(self, n: int, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            self.new_labels += n
            self._maybe_start(loop)

    def _maybe_start(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.opts.retrain_after is not None
        if self.running is not None or self.new_labels < self.opts.retrain_after:
            return
        self.new_labels = 0
        k = len(self.rounds) + 1
        rnd: dict[str, Any] = {"round": k, "state": "running", "dir": str(self.dir / f"round-{k}")}
        self.rounds.append(rnd)
        self.running = threading.Thread(target=self._round, args=(rnd, loop), name=f"retrain-{k}", daemon=True)
        self.running.start()

    def _round(self, rnd: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        import shlex
        import subprocess
        import time

        folder = Path(rnd["dir"])
        folder.mkdir(parents=True, exist_ok=True)
        labels, output = folder / "labels.jsonl", folder / "annotator.gguf"
        assert self.opts.labels_out is not None
        with labels.open("wb") as fh:  # the earlier labels, then every label the webhook wrote so far
            for src in (self.opts.retrain_with, self.opts.labels_out):
                if src is not None and src.exists():
                    data = src.read_bytes()
                    fh.write(data if data.endswith(b"\n") or not data else data + b"\n")
        cmd = [a.format(spec=self.opts.spec, labels=labels, output=output)
               for a in shlex.split(self.opts.retrain_command)]
        rnd["command"] = cmd
        t0 = time.perf_counter()
        with (folder / "log.txt").open("w") as out:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
            except OSError as e:
                out.write(f"could not run {cmd[0]}: {e}\n")
                rc = 127
        rnd["seconds"] = round(time.perf_counter() - t0, 1)
        rnd["returncode"] = rc
        new: Scorer | None = None
        if rc == 0 and output.is_file():
            try:
                new = Scorer(output, self.opts)
            except Exception as e:  # a file that does not load: keep serving the old one
                rnd["error"] = f"{type(e).__name__}: {e}"
        elif rc == 0:
            rnd["error"] = f"the command exited 0 but wrote no {output}"
        if new is None:
            rnd["state"] = "failed"
            log_text = (folder / "log.txt").read_text(errors="replace").strip().splitlines()
            rnd["log_tail"] = log_text[-5:]
            log.warning("retrain round %d failed (exit %d): %s", rnd["round"], rc, folder / "log.txt")
        else:
            old = self.app.state.scorer
            swapped = threading.Event()

            def swap() -> None:  # on the event loop: no request is between choosing a scorer and using it
                self.app.state.scorer = new
                swapped.set()

            loop.call_soon_threadsafe(swap)
            swapped.wait()
            old.close()  # waits for the work already given to it
            rnd["state"] = "serving"
            rnd["model_version"] = new.model_version
        with self.lock:
            self.running = None
            self._maybe_start(loop)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(model: Path, opts: ServeOptions, host: str, port: int, started: Any = None) -> None:
    """Load, bind, serve until interrupted (uvicorn handles SIGINT/SIGTERM), then free the model."""
    import uvicorn

    if not is_loopback(host) and not opts.token:
        raise ValueError(f"--host {host} is not a loopback address: give --token (or EDGE_ANNOTATOR_TOKEN) so that "
                         "only callers holding it are answered")
    if opts.retrain_after is not None and (opts.labels_out is None or opts.spec is None):
        raise ValueError("--retrain-after needs --labels-out (where the webhook's labels go) and --spec "
                         "(the spec YAML the retrain command trains on)")
    scorer = Scorer(model, opts)
    app = None
    try:
        app = make_app(scorer)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_keep_alive=30)
        server = uvicorn.Server(config)
        if started is not None:
            started(scorer)
        server.run()
    finally:
        (app.state.scorer if app is not None else scorer).close()


def _serve_command() -> Any:
    import click

    from .options import gpu_layers_option

    @click.command("serve")
    @click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                  help="Task spec YAML for a model without one embedded (zero-shot use of a base model).")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on; one other than loopback needs --token.")
    @click.option("--port", type=click.IntRange(0, 65535), default=9090, show_default=True)
    @click.option("--token", envvar="EDGE_ANNOTATOR_TOKEN", show_envvar=True, default=None,
                  help="Answer only requests carrying it (Bearer, or basic auth password).")
    @click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
                  help="Threads scoring items, each with its own llama.cpp context; predictions do not depend on it.")
    @click.option("--threads", type=click.IntRange(min=1), default=None, envvar="ANNOTATE_THREADS", show_envvar=True,
                  help="CPU threads in all, shared among the workers [default: all cores].")
    @click.option("--ctx", "n_ctx", type=click.IntRange(min=64), default=2048, show_default=True,
                  help="Context window in tokens; a longer task gets an error in its place.")
    @gpu_layers_option
    @click.option("--max-chars", type=click.IntRange(min=1), default=None,
                  help="Refuse task fields longer than this many characters.")
    @click.option("--queue", type=click.IntRange(min=1), default=1024, show_default=True,
                  help="Items that may wait; a request past it gets 503 and Retry-After.")
    @click.option("--max-body", type=click.IntRange(min=1024), default=32 << 20, show_default=True,
                  help="Largest request body in bytes (413 above).")
    @click.option("--labels-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Append the annotations Label Studio's webhook sends as human-label JSONL here.")
    @click.option("--retrain-after", type=click.IntRange(min=1), default=None,
                  help="After every N new labels from the webhook, run --retrain-command in the background and "
                       "serve its output once it exits 0 (needs --labels-out and --spec).")
    @click.option("--retrain-with", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                  help="Earlier human labels (JSONL) the retrain trains on with the new ones.")
    @click.option("--retrain-command", default=DEFAULT_RETRAIN, show_default=True,
                  help="The retrain; {spec}, {labels} and {output} are filled in (fit publishes only after parity).")
    @click.option("--retrain-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Where each round's labels, log and model go [default: beside --labels-out].")
    def serve(model: Path, spec_path: Path | None, host: str, port: int, token: str | None, workers: int,
              threads: int | None, n_ctx: int, gpu_layers: int, max_chars: int | None, queue: int, max_body: int,
              labels_out: Path | None, retrain_after: int | None, retrain_with: Path | None, retrain_command: str,
              retrain_dir: Path | None) -> None:
        """Serve MODEL as a Label Studio ML backend (/health, /setup, /predict, /webhook).

        Each task's prediction is the one annotate + convert --to label-studio make for the same
        item. Connect it in Label Studio under project Settings > Model; with --labels-out, the
        annotations experts make there come back as training data through its webhook.

        \b
        Examples:
          annotate-cli serve emobank.gguf --port 9090
          annotate-cli serve models/gemma-3-270m-q4_k_m.gguf --spec tasks/emobank.yaml --workers 2
          annotate-cli serve emobank.gguf --labels-out labels-back.jsonl
          annotate-cli serve emobank.gguf --spec tasks/emobank.yaml --labels-out new.jsonl \\
              --retrain-after 100 --retrain-with ratings.jsonl
          EDGE_ANNOTATOR_TOKEN=s3cret annotate-cli serve emobank.gguf --host 0.0.0.0
          curl -s localhost:9090/predict -d '{"tasks": [{"data": {"id": "s1", "text": "What a day!"}}]}'
        """
        opts = ServeOptions(spec=spec_path, threads=threads, workers=workers, n_ctx=n_ctx, gpu_layers=gpu_layers,
                            max_chars=max_chars, queue=queue, max_body=max_body, token=token, labels_out=labels_out,
                            retrain_after=retrain_after, retrain_with=retrain_with, retrain_command=retrain_command,
                            retrain_dir=retrain_dir)

        def started(s: Scorer) -> None:
            click.echo(f"serving {model.name} (spec {s.spec.name}, model_version {s.model_version}) on "
                       f"http://{host}:{port} with {workers} workers", err=True)

        from .engine import ModelError

        try:
            run(model, opts, host, port, started)
        except (ValueError, ModelError, OSError) as e:
            raise click.ClickException(str(e)) from None

    return serve


serve = _serve_command()
