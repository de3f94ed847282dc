"""The HTTP side of `annotate-cli serve`: Label Studio's ML backend routes over a Scorer.

    GET  /health    {"status": "UP", "model_class": "edge-annotator", "model_version": ...}
    POST /setup     {"project", "schema", ...} -> {"model_version"}; 422 when the project's labelling
                    interface has no control for one of the spec's criteria
    POST /predict   {"tasks": [{"id", "data": {...}}, ...]} -> {"results": [one per task]}
    POST /webhook   Label Studio's events: counted by action; with --labels-out, each new or
                    updated annotation is appended there as a human-label record (`train` reads it)

Every request passes one gate before a route sees it (`Gate`): the token where there is one; a
Host header naming loopback, the bound address or an --allow-host name (a page that rebinds its
own domain name to 127.0.0.1 sends its domain); no Origin other than an --allow-origin one (a
page of another site in the user's browser sends its own). A body is read only as
application/json (what a page can send without asking first is text/plain or a form), and only
up to --max-body bytes, chunked or not (`json_body`). The webhook writes labels only for a
caller holding the token, or from this machine's loopback through the gate.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from .data import InputError, Item
from .engine import ContextOverflow
from .feedback import records_from_tasks
from .jobs import overflow_error
from .retrain import LabelSink, Retrainer
from .serve_scorer import Scorer, ServeOptions, prediction, schema_controls, task_fields
from .untrusted import JSONError, loads

log = logging.getLogger(__name__)

MODEL_CLASS = "edge-annotator"
ROUTES = frozenset({"/", "/health", "/setup", "/predict", "/webhook", "/stats"})


class Refused(Exception):
    """A request answered with a 4xx and a reason, before or instead of its route's work."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, lower case, without port, brackets or a trailing dot."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.index("]")] if "]" in h else h
    name, _, port = h.rpartition(":")
    return (name if name and port.isdigit() else h).rstrip(".")


@dataclass(frozen=True)
class Gate:
    """Who may call the server, decided from a request's headers alone."""

    host: str
    """The address the server is bound to."""
    token: str | None = None
    allow_origins: frozenset[str] = frozenset()
    allow_hosts: frozenset[str] = frozenset()

    def refusal(self, headers: Any) -> Refused | None:
        if self.token is not None and not _authorized(headers.get("authorization"), self.token):
            return Refused(401, "this server needs its token: Authorization: Bearer TOKEN, or basic auth with "
                                "TOKEN as the password")
        host = headers.get("host")
        if not host or not self.host_ok(_host_name(host)):
            return Refused(403, f"Host {host!r} is not this server's (loopback, {self.host}"
                                + "".join(f", {h}" for h in sorted(self.allow_hosts))
                                + "); a name it is reached by goes in --allow-host")
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() not in self.allow_origins:
            return Refused(403, f"requests from pages of {origin} are refused; a page allowed to call this server "
                                f"goes in --allow-origin")
        return None

    def host_ok(self, name: str) -> bool:
        if name == "localhost" or name in self.allow_hosts or name == self.host.lower():
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False  # a name not listed: what DNS rebinding sends
        bound = ipaddress.ip_address(self.host) if self.host != "localhost" else None
        return ip.is_loopback or (bound is not None and (bound.is_unspecified or ip == bound))


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


async def json_body(request: Request) -> Any:
    """The request's JSON body: application/json only, read up to --max-body bytes whatever the
    framing (Content-Length or chunked), parsed within the bounds of runtime/untrusted.py."""
    limit = request.app.state.server.opts.max_body
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise Refused(415, f"the body must be application/json, not {ctype or 'untyped'}")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise Refused(413, f"request body of {size} bytes is over --max-body {limit}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise Refused(413, f"request body is over --max-body {limit} bytes (stopped reading at {n})")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return loads(body) if body else {}
    except JSONError as e:
        raise Refused(400, f"the request body is not JSON: {e}") from None


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
            return _error(422, f"the project's labelling interface is not XML: {e}")
        missing = [c.name for c in spec.criteria if c.name not in names]
        if missing:
            return _error(422, f"the project's labelling interface has no control named {', '.join(missing)} "
                               f"(spec '{spec.name}' needs one per criterion: {', '.join(spec.criterion_names)}); "
                               f"make the project with annotate-cli convert --label-config")
    return {"model_version": s.scorer.model_version}


def _task_error(e: InputError) -> dict[str, Any]:
    return {"task": e.item_id, "field": e.field, "message": e.reason}


@router.post("/predict")
async def predict(request: Request, body: Any = Depends(json_body)) -> Any:
    s = _server(request)
    spec, opts, stats = s.scorer.spec, s.opts, s.stats
    tasks = body.get("tasks") if isinstance(body, dict) else None
    if not isinstance(tasks, list) or not tasks:
        return _error(422, "the request needs 'tasks': a non-empty list of Label Studio tasks "
                           "({'id': ..., 'data': {field: text}})")
    if len(tasks) > opts.queue:
        return _error(413, f"{len(tasks)} tasks in one request; at most --queue {opts.queue} items wait, so send "
                           f"at most {opts.queue} tasks a request")
    if stats.pending + len(tasks) > opts.queue:
        stats.rejected_busy += 1
        return _error(503, f"busy: {stats.pending} items are waiting (--queue {opts.queue}); retry",
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
        return _error(422, f"no task of {len(tasks)} can be read with spec '{spec.name}' "
                           f"(fields {', '.join(spec.input_names)})", errors=errs)
    loop = asyncio.get_running_loop()
    stats.pending += len(todo)
    scorer = s.scorer  # this request's model, from here to its answer (a retrain may swap it)
    try:
        scored = await asyncio.gather(*[loop.run_in_executor(scorer.pool, scorer.score, f) for _, f in todo])
    finally:
        stats.pending -= len(todo)
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


@router.post("/webhook")
async def webhook(request: Request, body: Any = Depends(json_body)) -> Any:
    s = _server(request)
    if not isinstance(body, dict):
        return _error(422, "a Label Studio webhook event is a JSON object with 'action'")
    action = body.get("action")
    action = action if isinstance(action, str) and len(action) <= 100 else "?"
    written = 0
    if s.labels is not None and action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        client = request.client.host if request.client else ""
        if s.opts.token is None and not is_loopback(client):
            return _error(403, "labels are written only for a caller holding the token, or from this machine")
        task, ann = body.get("task"), body.get("annotation")
        if not isinstance(task, dict) or not isinstance(ann, dict):
            return _error(422, "an annotation event carries 'task' and 'annotation' objects")
        try:
            records, _ = records_from_tasks([{**task, "annotations": [ann]}], s.scorer.spec, None, "webhook")
            records = s.labels.check(records)
        except InputError as e:
            return _error(422, f"annotation not written: {e.reason}", field=e.field)
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
            return _error(refused.status, refused.message)
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Any:
        return _error(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        eid = secrets.token_hex(4)
        log.error("internal error %s on %s", eid, request.url.path, exc_info=exc)
        return _error(500, f"internal error {eid}: the server's log has its details", error_id=eid)

    app.include_router(router)
    return app
