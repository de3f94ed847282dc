"""The HTTP side of `annotate-cli serve`: Label Studio's ML backend routes over a Scorer.

    GET  /health    {"status": "UP", "model_class": "edge-annotator", "model_version": ...}
    POST /setup     {"project", "schema", ...} -> {"model_version"}; 422 when the project's labelling
                    interface has no control for one of the spec's criteria
    POST /predict   {"tasks": [{"id", "data": {...}}, ...]} -> {"results": [one per task]}
    POST /webhook   Label Studio's events: counted by action; with --labels-out, each new or
                    updated annotation is appended there as a human-label record (`train` reads it)

Every request passes the gate of runtime/serve_gate.py before a route sees it, and a body is
read only through its `json_body`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

from fastapi import APIRouter, Depends, FastAPI, Request

from .data import InputError, Item
from .engine import ContextOverflow
from .feedback import records_from_tasks
from .jobs import overflow_error
from .retrain import LabelSink, Retrainer
from .serve_gate import Gate, Refused, error_response, is_loopback, json_body
from .serve_scorer import Scorer, ServeOptions, prediction, schema_controls, shows_review, task_fields

log = logging.getLogger(__name__)

MODEL_CLASS = "edge-annotator"
ROUTES = frozenset({"/", "/health", "/setup", "/predict", "/webhook", "/stats"})


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    predicted: int = 0
    task_errors: int = 0
    rejected_busy: int = 0
    webhook_actions: Counter[str] = field(default_factory=Counter)
    labels_written: int = 0
    pending: int = 0


@dataclass
class Server:
    """What the routes read from app.state.server: the scorer answering now, and the rest."""

    scorer: Scorer
    opts: ServeOptions
    gate: Gate
    stats: Stats = field(default_factory=Stats)
    labels: LabelSink | None = None
    retrainer: Retrainer | None = None


router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server  # type: ignore[no-any-return]


@router.get("/health")
@router.get("/")
async def health(request: Request) -> dict[str, Any]:
    s = _server(request)
    spec = s.scorer.spec
    out = {"status": "UP", "model_class": MODEL_CLASS, "model_version": s.scorer.model_version,
           "model": s.scorer.path.name, "spec": spec.name, "criteria": spec.criterion_names,
           "workers": s.opts.workers, "pending": s.stats.pending, "predicted": s.stats.predicted}
    if s.retrainer is not None:
        st = s.retrainer.status()
        out["retrain"] = {"running": st["running"], "rounds": len(st["rounds"]),
                          "last": st["rounds"][-1] if st["rounds"] else None}
    return out


@router.post("/setup")
async def setup(request: Request, body: Any = Depends(json_body)) -> Any:
    s = _server(request)
    spec = s.scorer.spec
    schema = body.get("schema") if isinstance(body, dict) else None
    if isinstance(schema, str) and schema.strip():
        try:
            names = schema_controls(schema)
        except ElementTree.ParseError as e:
            return error_response(422, f"the project's labelling interface is not XML: {e}")
        missing = [c.name for c in spec.criteria if c.name not in names]
        if missing:
            return error_response(422, f"the project's labelling interface has no control named "
                                       f"{', '.join(missing)} (spec '{spec.name}' needs one per criterion: "
                                       f"{', '.join(spec.criterion_names)}); make the project with annotate-cli "
                                       f"convert --label-config")
    return {"model_version": s.scorer.model_version}


def _task_error(e: InputError) -> dict[str, Any]:
    return {"task": e.item_id, "field": e.field, "message": e.reason}


@router.post("/predict")
async def predict(request: Request, body: Any = Depends(json_body)) -> Any:
    s = _server(request)
    spec, opts, stats = s.scorer.spec, s.opts, s.stats
    tasks = body.get("tasks") if isinstance(body, dict) else None
    if not isinstance(tasks, list) or not tasks:
        return error_response(422, "the request needs 'tasks': a non-empty list of Label Studio tasks "
                                   "({'id': ..., 'data': {field: text}})")
    if len(tasks) > opts.queue:
        return error_response(413, f"{len(tasks)} tasks in one request; at most --queue {opts.queue} items wait, "
                                   f"so send at most {opts.queue} tasks a request")
    if stats.pending + len(tasks) > opts.queue:
        stats.rejected_busy += 1
        return error_response(503, f"busy: {stats.pending} items are waiting (--queue {opts.queue}); retry",
                              headers={"Retry-After": "1"})
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
        return error_response(422, f"no task of {len(tasks)} can be read with spec '{spec.name}' "
                                   f"(fields {', '.join(spec.input_names)})", errors=errs)
    loop = asyncio.get_running_loop()
    stats.pending += len(todo)
    scorer = s.scorer  # this request's model, from here to its answer (a retrain may swap it)
    try:
        scored = await asyncio.gather(*[loop.run_in_executor(scorer.pool, scorer.score, f) for _, f in todo])
    finally:
        stats.pending -= len(todo)
    review = shows_review(spec, body.get("label_config"))
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
        results.append(prediction(item_id, res, spec, scorer.sha256, review))
        stats.predicted += 1
    return {"results": results, "model_version": scorer.model_version}


@router.post("/webhook")
async def webhook(request: Request, body: Any = Depends(json_body)) -> Any:
    s = _server(request)
    if not isinstance(body, dict):
        return error_response(422, "a Label Studio webhook event is a JSON object with 'action'")
    action = body.get("action")
    action = action if isinstance(action, str) and len(action) <= 100 else "?"
    written = 0
    if s.labels is not None and action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        client = request.client.host if request.client else ""
        if s.opts.token is None and not is_loopback(client):
            return error_response(403, "labels are written only for a caller holding the token, or from this machine")
        task, ann = body.get("task"), body.get("annotation")
        if not isinstance(task, dict) or not isinstance(ann, dict):
            return error_response(422, "an annotation event carries 'task' and 'annotation' objects")
        try:
            records, _ = records_from_tasks([{**task, "annotations": [ann]}], s.scorer.spec, None, "webhook")
            records = s.labels.check(records)
        except InputError as e:
            return error_response(422, f"annotation not written: {e.reason}", field=e.field)
        written = await asyncio.get_running_loop().run_in_executor(None, s.labels.append, records)
        s.stats.labels_written += written
        if s.retrainer is not None and written:
            s.retrainer.add(written)
    s.stats.webhook_actions[action] += 1
    return {"status": "ok", "action": action, "labels_written": written, "counts": dict(s.stats.webhook_actions)}


@router.get("/stats")
async def get_stats(request: Request) -> dict[str, Any]:
    s = _server(request)
    st = s.stats
    return {"requests": dict(st.requests), "predicted": st.predicted, "task_errors": st.task_errors,
            "rejected_busy": st.rejected_busy, "pending": st.pending, "webhook_actions": dict(st.webhook_actions),
            "labels_written": st.labels_written, "model_version": s.scorer.model_version,
            "retrain": s.retrainer.status() if s.retrainer is not None else None}


def make_app(scorer: Scorer, gate: Gate, labels: LabelSink | None = None) -> FastAPI:
    """The application over a Scorer: the gate, the routes, and with --retrain-after the retrainer."""
    app = FastAPI(title="edge-annotator", version=scorer.model_version, docs_url=None, redoc_url=None,
                  openapi_url=None)
    server = Server(scorer, scorer.opts, gate, labels=labels)
    app.state.server = server
    loop_box: dict[str, asyncio.AbstractEventLoop] = {}

    def swap_to(new: Scorer) -> None:  # from the retrain thread: swapped on the event loop, between requests
        swapped, old = threading.Event(), server.scorer

        def swap() -> None:
            server.scorer = new
            swapped.set()

        loop_box["loop"].call_soon_threadsafe(swap)
        swapped.wait()
        old.close()  # waits for the work already given to it

    if scorer.opts.retrain_after is not None:
        server.retrainer = Retrainer(swap_to, scorer.opts, scorer.spec)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        loop_box.setdefault("loop", asyncio.get_running_loop())
        path = request.url.path
        server.stats.requests[path if path in ROUTES else "other"] += 1
        refused = gate.refusal(request.headers)
        if refused is not None:
            return error_response(refused.status, refused.message)
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Any:
        return error_response(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        eid = secrets.token_hex(4)
        log.error("internal error %s on %s", eid, request.url.path, exc_info=exc)
        return error_response(500, f"internal error {eid}: the server's log has its details", error_id=eid)

    app.include_router(router)
    return app
