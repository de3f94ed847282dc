"""An annotation job over one input file: streaming, per-record flushed, resumable.

Every input record yields exactly one output line, in input order: a result, or (with
``on_error="skip"``) an error record naming file, line and field. Records that repeat an id with
the same inputs (another rater's row of a human-labelled file) are annotated once.

Resuming reads what an earlier run wrote, drops a torn last line, and skips the records already
answered, so the finished file is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal

import numpy as np

from .annotator import Annotator
from .data import InputError, Item, check_item, file_format, iter_rows
from .engine import ContextOverflow, LlamaEngine, LlamaModel, default_threads
from .errors import OutputError
from .files import refuse_inputs
from .records import error_record, result_record, write_jsonl_line
from .spec import TaskSpec
from .untrusted import JSONError, loads

log = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]


@dataclass
class JobStats:
    written: int = 0
    errors: int = 0
    resumed: int = 0
    duplicates: int = 0
    tokens_evaluated: int = 0
    error_messages: list[str] = field(default_factory=list)


@dataclass
class ResumeState:
    done_ids: set[str] = field(default_factory=set)
    done_error_lines: set[int] = field(default_factory=set)
    records: int = 0


RECORD_START = b'{"id":'
"""How every record annotate writes begins (records.jsonl_line of result_record or error_record)."""


def load_resume_state(out_path: Path, stamp: Mapping[str, str]) -> ResumeState:
    """What an earlier run of the same job wrote, after checking that it is that: every line a
    record of annotate's carrying this job's model_sha256 and spec_sha256, the last one possibly
    torn (unterminated, killed mid-write: it is cut off and redone). Anything else is refused with
    OutputError naming the file and what it holds, before a byte of it changes."""
    state = ResumeState()
    if not out_path.exists():
        return state
    if not out_path.is_file():
        raise OutputError(f"{out_path}: --resume continues a file of annotate's records; this is not a file")
    good_end = 0
    size = out_path.stat().st_size

    def refuse(line: int, what: str) -> OutputError:
        return OutputError(f"{out_path}:{line}: --resume continues only annotate's own output of this job; this "
                           f"file holds {what}. Nothing was changed; write to another -o file")

    with out_path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                if not (raw.startswith(RECORD_START) or RECORD_START.startswith(raw)):
                    raise refuse(lineno, "a last line that is not an annotate record")
                break  # killed mid-write: this line is dropped and redone
            try:
                rec = loads(raw)
            except JSONError:
                raise refuse(lineno, "a line that is not JSON") from None
            if not isinstance(rec, dict) or "id" not in rec or not raw.startswith(RECORD_START):
                raise refuse(lineno, "a record that annotate did not write")
            got = {k: rec.get(k) for k in stamp}
            if got != dict(stamp):
                which = ", ".join(f"{k} {str(got[k])[:12]}... (this job: {v[:12]}...)" for k, v in stamp.items()
                                  if got[k] != v)
                raise refuse(lineno, f"records of another model or spec: {which}")
            good_end += len(raw)
            state.records += 1
            err = rec.get("error")
            if isinstance(err, dict) and isinstance(err.get("line"), int):
                state.done_error_lines.add(err["line"])
            elif rec.get("id") is not None:
                state.done_ids.add(str(rec["id"]))
    if good_end != size:
        log.warning("%s: dropping a torn last record (%d bytes) before resuming", out_path, size - good_end)
        with out_path.open("r+b") as tail:
            tail.truncate(good_end)
    return state


def count_records(path: str | Path) -> int:
    """Number of records, for the progress bar: non-blank lines of a JSONL file, read as bytes and
    not parsed (the job parses each line once); CSV records can span lines, so CSV is read through."""
    fmt = file_format(path)
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        except Exception:  # unreadable, or no pyarrow: the reader says which, naming the file
            pass
    return sum(1 for _ in iter_rows(path))


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1  # 0 marks an empty slot


def _fields_key(fields: dict[str, str]) -> int:
    return _h64(json.dumps(fields, sort_keys=True).encode())


class IdTable:
    """id -> (inputs hash, first line) in flat numpy arrays: 20 bytes a slot, at most 2/3 full.

    The one structure of a job that grows with the input (repeated rows and conflicting ids can be
    anywhere in a file): about 30-60 bytes per distinct id, where a dict of strings took ~300.
    Ids are kept as 64-bit hashes; two ids colliding (odds ~n^2/2^65) would show up as a
    "duplicate id" error record, never as a silently skipped item, unless their inputs collide too.
    """

    def __init__(self, capacity: int = 1 << 12):
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.vals = np.zeros(capacity, dtype=np.uint64)
        self.lines = np.zeros(capacity, dtype=np.uint32)
        self.n = 0

    def _slot(self, key: int) -> int:
        mask = len(self.keys) - 1
        i = key & mask
        while True:
            k = int(self.keys[i])
            if k == 0 or k == key:
                return i
            i = (i + 1) & mask

    def setdefault(self, item_id: str, value: int, line: int) -> tuple[int, int] | None:
        """The (value, line) stored for item_id if it was seen; else store these and return None.

        One hash and one probe per record: the job asks and records in the same step."""
        if 3 * (self.n + 1) > 2 * len(self.keys):
            self._grow()
        key = _h64(item_id.encode("utf-8", "surrogateescape"))
        i = self._slot(key)
        if self.keys[i]:
            return int(self.vals[i]), int(self.lines[i])
        self.n += 1
        self.keys[i], self.vals[i], self.lines[i] = key, value, min(line, 2**32 - 1)
        return None

    def _grow(self) -> None:
        old = (self.keys, self.vals, self.lines)
        size = 2 * len(self.keys)
        self.keys, self.vals = np.zeros(size, dtype=np.uint64), np.zeros(size, dtype=np.uint64)
        self.lines = np.zeros(size, dtype=np.uint32)
        for k, v, ln in zip(*(a[old[0] != 0] for a in old)):
            i = self._slot(int(k))
            self.keys[i], self.vals[i], self.lines[i] = k, v, ln


Scorer = Callable[[list[dict[str, str]]], list[Any]]


def run_job(annotator: Annotator, input_path: str | Path, out: IO[str], *, model_sha256: str,
            on_error: OnError = "fail", resume: ResumeState | None = None, max_chars: int | None = None,
            progress: Callable[[int], None] | None = None, pool: WorkerPool | None = None) -> JobStats:
    """Annotate every record of input_path into `out`; raise InputError on the first bad one if on_error='fail'.

    Valid items are scored in groups of `annotator.batch`, formed over every valid item in input
    order (already-done ones included), so a resumed job scores the same groups as the first run.
    With a `pool`, groups are scored in worker processes and written here in input order.
    """
    stats = JobStats()
    state = resume or ResumeState()
    stamp = {"model_sha256": model_sha256, "spec_sha256": annotator.spec.sha256}
    start_tokens = annotator.engine.n_evaluated

    def emit_error(err: InputError) -> None:
        stats.errors += 1
        if len(stats.error_messages) < 20:
            stats.error_messages.append(str(err))
        if err.line not in state.done_error_lines:
            write_jsonl_line(out, error_record(err, stamp))

    def write(chunk: list[Event], scores: list[Any] | None) -> None:
        items = [x for x in chunk if isinstance(x, Item)]
        by_item = dict(zip((id(it) for it in items), scores or [None] * len(items)))
        for x in chunk:
            if progress:
                progress(1)
            if isinstance(x, Skipped):
                emit_error(x.error)
            elif isinstance(x, Fatal):
                raise x.error
            elif x.id in state.done_ids:
                stats.resumed += 1
            else:
                res = by_item[id(x)]
                if isinstance(res, ContextOverflow):
                    err = overflow_error(x, res)
                    if on_error == "fail":
                        raise err
                    emit_error(err)
                    continue
                write_jsonl_line(out, result_record(x.id, res, stamp))
                stats.written += 1

    def needs_scoring(chunk: list[Event]) -> list[dict[str, str]] | None:
        items = [x for x in chunk if isinstance(x, Item)]
        return [it.fields for it in items] if any(it.id not in state.done_ids for it in items) else None

    chunks = plan(input_path, annotator.spec, annotator.batch, on_error, max_chars, stats)
    if pool is None:
        for chunk in chunks:
            todo = needs_scoring(chunk)
            write(chunk, annotator.score_many(todo) if todo else None)
    else:
        for chunk, scores in pool.ordered(chunks, needs_scoring):
            write(chunk, scores)
    stats.tokens_evaluated = annotator.engine.n_evaluated - start_tokens
    return stats


def overflow_error(item: Item, res: ContextOverflow) -> InputError:
    longest = max(item.fields, key=lambda k: len(item.fields[k]))
    return InputError(item.path, item.line, f"text too long: the prompt {res}", longest, item.id)


@dataclass(frozen=True)
class Skipped:
    """A bad record that becomes an error record in the output (on_error='skip')."""

    error: InputError


@dataclass(frozen=True)
class Fatal:
    """A bad record that ends the job (on_error='fail'): the last event; nothing after it is read."""

    error: InputError


Event = Item | Skipped | Fatal
"""What one input record becomes: an item to score, or a bad record skipped or fatal."""


def plan(input_path: str | Path, spec: TaskSpec, batch: int, on_error: OnError, max_chars: int | None,
         stats: JobStats, stream: BinaryIO | None = None) -> Iterator[list[Event]]:
    """The input as consecutive chunks of events, one per record, each chunk holding one scoring
    group of valid items. Repeated rows of one item (same id, same inputs) are dropped and counted.
    The local job and the Ray job (runtime/ray_job.py) both read their input through here.
    """
    seen = IdTable()  # id -> (inputs hash, first line)
    pending: list[Event] = []
    n_items = 0

    def bad(err: InputError) -> bool:
        pending.append(Fatal(err) if on_error == "fail" else Skipped(err))
        return on_error == "fail"

    for row in iter_rows(input_path, stream):
        try:
            item = check_item(row, spec, max_chars=max_chars)
        except InputError as e:
            if bad(e):
                break
            continue
        key = _fields_key(item.fields)
        first = seen.setdefault(item.id, key, item.line)
        if first is not None:
            if first[0] == key:
                stats.duplicates += 1  # another rater's row of the same item
                continue
            if bad(InputError(item.path, item.line, f"duplicate id '{item.id}' with different inputs "
                              f"(first seen at line {first[1]})", "id", item.id)):
                break
            continue
        pending.append(item)
        n_items += 1
        if n_items % batch == 0:
            yield pending
            pending = []
    if pending:
        yield pending


# -- worker processes --------------------------------------------------------------------------

_worker: Annotator | None = None


def _worker_init(model: str, spec_json: str, n_ctx: int, threads: int, batch: int, gpu_layers: int,
                 base: str | None) -> None:
    global _worker
    from .spec import spec_from_json

    _worker = Annotator(LlamaEngine(model, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers, base=base),
                        spec_from_json(spec_json), batch=batch)


def _worker_score(fields: list[dict[str, str]]) -> list[Any]:
    assert _worker is not None
    return _worker.score_many(fields)


class WorkerPool:
    """N processes, each with its own copy of the model, scoring groups in a bounded ordered window."""

    def __init__(self, workers: int, model: str | Path, annotator: Annotator, threads_per_worker: int,
                 gpu_layers: int = 0, base: str | Path | None = None):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self._ex = ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
            initargs=(str(model), annotator.spec.to_json(), annotator.engine.n_ctx, threads_per_worker,
                      annotator.batch, gpu_layers, str(base) if base else None))

    def ordered(self, chunks: Iterator[list[Event]],
                fields_of: Callable[[list[Event]], list[dict[str, str]] | None]
                ) -> Iterator[tuple[list[Event], list[Any] | None]]:
        """(chunk, scores) in input order; at most 4 groups per worker are read ahead (bounded memory)."""
        from collections import deque

        window: deque[tuple[list[Event], Any]] = deque()
        for chunk in chunks:
            todo = fields_of(chunk)
            window.append((chunk, self._ex.submit(_worker_score, todo) if todo else None))
            while len(window) >= 4 * self.workers:
                c, fut = window.popleft()
                yield c, fut.result() if fut else None
        while window:
            c, fut = window.popleft()
            yield c, fut.result() if fut else None

    def close(self) -> None:
        self._ex.shutdown(cancel_futures=True)


# -- an estimate before long work -----------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """What a job will process and how long it should take, from a timed sample of its first items.

    Time is extrapolated by characters of input, not by items: a job of long replies after short
    ones would otherwise be promised too soon. Tokens likewise (the shared instruction once)."""

    records: int
    items: int
    """Valid records (bad ones are left out of the time)."""
    chars: int
    sample_items: int
    sample_seconds: float
    sample_tokens: int
    tokens: int
    seconds: float
    workers: int = 1

    def line(self) -> str:
        rate = self.sample_items / self.sample_seconds if self.sample_seconds else 0.0
        per = self.tokens / self.items if self.items else 0
        who = f" on {self.workers} workers" if self.workers > 1 else ""
        return (f"{self.items:,} items ({self.records - self.items:,} bad records left out), about "
                f"{self.tokens:,} tokens ({per:,.0f} an item): about {_duration(self.seconds)}{who}, timed on the "
                f"first {self.sample_items} items ({rate:.2f} items/s)")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self) | {"items_per_s": self.sample_items / self.sample_seconds if self.sample_seconds else None}


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def estimate(annotator: Annotator, input_path: str | Path, max_chars: int | None = None, sample: int = 16,
             workers: int = 1) -> Estimate:
    """Read every record (no scoring), then score the first `sample` valid items, after one more
    that decodes the shared instruction, and extrapolate by characters. Scoring is deterministic
    whatever ran before (tests/test_runtime.py), so a job that runs after this writes the same bytes."""
    import time

    records = items = chars = 0
    first: list[Item] = []
    seen = IdTable()
    for row in iter_rows(input_path):
        records += 1
        try:
            it = check_item(row, annotator.spec, max_chars=max_chars)
        except InputError:
            continue
        if seen.setdefault(it.id, _fields_key(it.fields), it.line) is not None:
            continue  # another rater's row of an item (or a duplicate id, an error record in the job)
        items += 1
        chars += sum(len(v) for v in it.fields.values())
        if len(first) <= sample:
            first.append(it)
    if len(first) > 1:
        annotator.score_many([first[0].fields])  # the instruction, decoded once per job
        timed = first[1:]
    else:
        timed = first
    eng = annotator.engine
    before, t0 = eng.n_evaluated, time.perf_counter()
    annotator.score_many([it.fields for it in timed])
    dt, toks = time.perf_counter() - t0, eng.n_evaluated - before
    sample_chars = sum(len(v) for it in timed for v in it.fields.values()) or 1
    scale = chars / sample_chars
    return Estimate(records, items, chars, len(timed), dt, toks, int(toks * scale), dt * scale / max(workers, 1),
                    workers)


# -- one annotation job: what annotate-cli, bench and the determinism check all run ----------------

@dataclass(frozen=True)
class JobOptions:
    """How to run a job; annotate-cli's flags of the same names."""

    spec: Path | None = None
    """A spec YAML for a model with none embedded (zero-shot); None: the model's own."""
    base: Path | None = None
    """An adapter annotator's base GGUF where it is not beside the adapter (--base-model)."""
    threads: int | None = None
    n_ctx: int = 2048
    gpu_layers: int = 0
    batch: int = 1
    workers: int = 1
    on_error: OnError = "fail"
    max_chars: int | None = None


def open_model(model: str | Path, spec_path: str | Path | None = None, gpu_layers: int = 0,
               base: str | Path | None = None) -> tuple[LlamaModel, TaskSpec]:
    """Load a GGUF and resolve the spec it annotates with: the embedded one, or SPEC_PATH's for a
    model without one (gguf_meta.resolve_spec says which wins and refuses a mismatch). BASE: an
    adapter file's base GGUF where it is not beside it."""
    from .gguf_meta import model_info, resolve_spec
    from .spec import load_spec

    llm = LlamaModel(model, n_gpu_layers=gpu_layers, base=base)
    try:
        return llm, resolve_spec(model_info(llm), load_spec(spec_path) if spec_path else None)
    except BaseException:
        llm.close()
        raise


def annotate_file(model: str | Path, input_path: str | Path, output: str | None | IO[str],
                  options: JobOptions = JobOptions(), *, resume: bool = False,
                  progress: Callable[[int], None] | None = None, started: Callable[[], None] | None = None,
                  estimated: Callable[[Estimate], None] | None = None, dry_run: bool = False) -> JobStats:
    """Annotate every record of INPUT_PATH with MODEL into OUTPUT: a path (opened fresh, or for
    append with `resume`), None or "-" for stdout, or an open text stream the caller owns.

    Every check on the model and the spec runs before the output is opened; `started` is called
    then, before the first record. With `estimated`, the job's Estimate (a timed sample of its
    first items) is handed to it first; with `dry_run`, only that: nothing is opened or written.
    Returns the job's counts; raises InputError on the first bad record with on_error="fail"."""
    from .gguf_file import sha256_file

    llm, spec = open_model(model, options.spec, options.gpu_layers, options.base)
    try:
        model_sha = sha256_file(model)
        with LlamaEngine(llm, n_ctx=options.n_ctx, n_threads=options.threads) as engine:
            annotator = Annotator(engine, spec, batch=options.batch)
            if estimated is not None or dry_run:
                got = estimate(annotator, input_path, options.max_chars, workers=options.workers)
                if estimated is not None:
                    estimated(got)
                if dry_run:
                    return JobStats()
            if output is None or isinstance(output, str):
                stamp = {"model_sha256": model_sha, "spec_sha256": spec.sha256}
                (out, state), owned = open_output(output, resume, stamp, [input_path, model]), True
            else:
                out, state, owned = output, None, False
            pool = None
            try:
                if started:
                    started()
                if options.workers > 1:
                    per_worker = max(1, (options.threads or default_threads()) // options.workers)
                    pool = WorkerPool(options.workers, model, annotator, per_worker, options.gpu_layers, options.base)
                return run_job(annotator, input_path, out, model_sha256=model_sha, on_error=options.on_error,
                               resume=state, max_chars=options.max_chars, progress=progress, pool=pool)
            finally:
                if pool:
                    pool.close()
                if owned:
                    fsync_close(out)
    finally:
        llm.close()


def open_output(path: str | None, resume: bool, stamp: Mapping[str, str], inputs: Sequence[str | Path] = ()
                ) -> tuple[IO[str], ResumeState | None]:
    """stdout, or a file opened for append (resume, after load_resume_state's checks) or fresh
    write (refused where it exists and holds anything); never one of the job's INPUTS."""
    import sys

    if path in (None, "-"):
        if resume:
            raise OutputError("--resume needs -o FILE: a job written to stdout cannot be resumed")
        return sys.stdout, None
    p = Path(path)
    refuse_inputs(p, inputs)
    if p.is_dir():
        raise OutputError(f"{p}: -o names a folder; give a file (e.g. {p / 'labels.jsonl'})")
    p.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_resume_state(p, stamp)
        return p.open("a", encoding="utf-8"), state
    if p.exists() and p.stat().st_size > 0:
        raise OutputError(f"{p} exists; pass --resume to continue that job, or remove it")
    return p.open("w", encoding="utf-8"), None


def fsync_close(fh: IO[Any]) -> None:
    import sys

    if fh is sys.stdout:
        fh.flush()
        return
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
