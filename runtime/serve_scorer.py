"""What `annotate-cli serve` scores with: its options, the loaded model with its worker threads,
and a Label Studio task read as an item and answered as annotate + convert would.

    scorer = Scorer(Path("annotator.gguf"), ServeOptions(workers=2))
    item_id, fields = task_fields({"id": 3, "data": {"id": "s1", "text": "What a day!"}}, 0, scorer.spec, None)
    answer = prediction(item_id, scorer.score(fields), scorer.spec, scorer.sha256)
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from .annotator import Annotator, check_context
from .data import InputError, Row, check_item
from .engine import LlamaEngine, default_threads
from .records import jsonl_line, prediction_of, result_record
from .spec import TaskSpec
from .tool_formats import REVIEW_KEY, has_trust_rule, label_studio_prediction

DEFAULT_RETRAIN = "annotate-cli fit {spec} {labels} -o {output}"
"""--retrain-command's default: fit publishes its file only after parity passes (train/fit.py)."""


@dataclass
class ServeOptions:
    spec: Path | None = None
    threads: int | None = None
    workers: int = 2
    n_ctx: int = 2048
    gpu_layers: int = 0
    base: Path | None = None
    """An adapter annotator's base GGUF where it is not beside the adapter (--base-model)."""
    max_chars: int | None = None
    queue: int = 1024
    max_body: int = 32 << 20
    token: str | None = None
    allow_origins: tuple[str, ...] = ()
    """Origins (scheme://host[:port]) whose browser pages may call the server; none by default."""
    allow_hosts: tuple[str, ...] = ()
    """Host names besides loopback and the bound address that requests may name (e.g. the name a
    Label Studio container uses, host.docker.internal)."""
    labels_out: Path | None = None
    retrain_after: int | None = None
    retrain_with: Path | None = None
    retrain_command: str = DEFAULT_RETRAIN
    retrain_dir: Path | None = None


class Scorer:
    """The loaded model and `workers` threads, each with its own context and Annotator (batch 1)."""

    def __init__(self, model_path: Path, opts: ServeOptions):
        from .gguf_file import sha256_file
        from .jobs import open_model

        self.path = Path(model_path)
        self.llm, self.spec = open_model(model_path, opts.spec, opts.gpu_layers, opts.base)
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

    def score(self, fields: dict[str, str]) -> Any:
        annotator: Annotator = self._local.annotator
        return annotator.score_many([fields])[0]

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
    item_id = raw_id if raw_id is not None else f"tasks[{i}]"
    try:
        item = check_item(Row(where, i, {**data, "id": item_id}), spec, max_chars=max_chars)
    except InputError as e:
        raise InputError(where, None, e.reason, f"tasks[{i}].data.{e.field}" if e.field else f"tasks[{i}]",
                         e.item_id or (str(item_id) if isinstance(item_id, str | int) else None)) from None
    return item.id, item.fields


def prediction(item_id: str, scores: Any, spec: TaskSpec, sha256: str, review: bool = False) -> dict[str, Any]:
    """The Label Studio prediction annotate-cli convert makes of annotate's record for this item:
    the record is written and read back as annotate writes it, so the two agree to the byte. With a
    trust rule in the spec the record carries its marks, and REVIEW (the project's interface has the
    review control) adds the rule's verdict in words."""
    rec = json.loads(jsonl_line(result_record(item_id, scores, {"model_sha256": sha256,
                                                                "spec_sha256": spec.sha256})))
    return label_studio_prediction(prediction_of(Row("serve", 0, rec), spec), spec, review=review)


def shows_review(spec: TaskSpec, schema: Any) -> bool:
    """Whether predictions for this project carry the trust rule's verdict: the spec has a rule and
    the project's interface (Label Studio sends it with /predict as `label_config`) has the control
    annotate-cli convert --label-config makes for it. An interface that cannot be read: no."""
    if not has_trust_rule(spec) or not isinstance(schema, str):
        return False
    try:
        return REVIEW_KEY in schema_controls(schema)
    except ElementTree.ParseError:
        return False


def schema_controls(schema: str) -> set[str]:
    """The names of a labelling interface's controls (elements with name and toName). A document
    type declaration (entities) is refused: a labelling config never has one."""
    if "<!DOCTYPE" in schema.upper() or "<!ENTITY" in schema.upper():
        raise ElementTree.ParseError("a document type declaration is not allowed")
    root = ElementTree.fromstring(schema)
    return {el.attrib["name"] for el in root.iter() if "name" in el.attrib and "toName" in el.attrib}
