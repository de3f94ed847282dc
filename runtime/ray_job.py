"""Annotation on a Ray cluster with Ray Data: the same files, the same annotator code, the same records.

    annotate-cli annotate annotator.gguf shards/*.jsonl --engine ray --actors 8 --threads 4 -o out/

Pipeline (one Ray Dataset, streamed):

1. read     `ray.data.read_binary_files` reads each input shard (JSONL, CSV or Parquet) whole;
2. plan     `flat_map` parses a shard with the local job's own reader and checks (runtime/jobs.py
            `plan`): the same error records with the same file and line, the same handling of
            repeated rows, per shard exactly as `annotate-cli annotate SHARD` would;
3. score    `map_batches` over an actor pool: each actor loads the GGUF once, builds the same
            `Annotator` as the local path, and turns each item into its output line with the same
            serialisation (runtime/records.py `jsonl_line`);
4. write    the driver streams the lines in input order (Ray Data's preserve_order) into
            OUT_DIR/part-NNNNN.jsonl (or .parquet), each shard written to a temporary name and
            renamed when complete, then OUT_DIR/_manifest.json.

Determinism: scoring an item does not depend on what an actor scored before (runtime/engine.py's
fixed decode schedule), so `cat OUT_DIR/part-*.jsonl` is byte-identical to the local outputs of the
input files, concatenated. Faults: an actor that dies (killed, out of memory, node lost) is restarted
by Ray and its batch re-run (max_restarts / max_task_retries); records reach the driver once per
batch, so nothing is lost or written twice. `--batch` above 1 groups items across files and is not
offered here: the Ray path is the exact one.

Ray is an optional extra (`pip install 'edge-annotator[ray]'`); nothing else in the runtime imports it.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import InputError
from .errors import UserError
from .jobs import Fatal, JobStats, OnError, Skipped, overflow_error, plan
from .records import error_record, jsonl_line, result_record


class RayJobError(UserError, RuntimeError):
    pass


def _plan_shard(row: dict[str, Any], *, spec_json: str, order: dict[str, int], on_error: OnError,
                max_chars: int | None) -> list[dict[str, Any]]:
    """flat_map: one input shard -> one row per output record, in the shard's order."""
    from .spec import spec_from_json

    spec = spec_from_json(spec_json)
    name = _given_name(order, str(row["path"]))
    out: list[dict[str, Any]] = []
    stats = JobStats()
    for chunk in plan(name, spec, 1, on_error, max_chars, stats, io.BytesIO(row["bytes"])):
        for x in chunk:
            if isinstance(x, Fatal):
                raise x.error
            seq = len(out)
            base = {"shard": order[name], "seq": seq}
            if isinstance(x, Skipped):
                out.append({**base, "item_id": x.error.item_id or "", "fields": "",
                            "error": json.dumps(x.error.to_record())})
            else:
                out.append({**base, "item_id": x.id, "fields": json.dumps(x.fields), "error": "",
                            "path": x.path, "line": x.line})
    for r in out:  # one schema for every row
        r.setdefault("path", name)
        r.setdefault("line", 0)
    return out


def _given_name(order: dict[str, int], path: str) -> str:
    """The input as the user named it, for a path as Ray reports it (absolute, or without a URI scheme)."""
    for g in order:
        if g == path or g.split("://", 1)[-1] == path or os.path.abspath(g) == os.path.abspath(path):
            return g
    raise RayJobError(f"Ray read {path}, which is none of the inputs {list(order)}")


def _our_error(e: BaseException) -> InputError | None:
    """The InputError (bad record, --on-error fail) inside the exceptions Ray wraps it in, if any."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, InputError):
            return InputError(x.path, x.line, x.reason, x.field, x.item_id)
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


class _Scorer:
    """The actor: one model load, the local path's Annotator, one output line per row."""

    def __init__(self, model: str, spec_json: str, n_ctx: int, threads: int, stamp: dict[str, str],
                 on_error: OnError, gpu_layers: int = 0, base: str | None = None):
        from .annotator import Annotator
        from .engine import LlamaEngine
        from .spec import spec_from_json

        self.annotator = Annotator(LlamaEngine(model, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers,
                                               base=base),
                                   spec_from_json(spec_json))
        self.stamp, self.on_error = stamp, on_error

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from .data import Item
        from .engine import ContextOverflow

        lines = []
        for i in range(len(batch["seq"])):
            if batch["error"][i]:
                err = InputError.from_record(json.loads(batch["error"][i]), str(batch["item_id"][i]) or None)
                lines.append(jsonl_line(error_record(err, self.stamp)))
                continue
            item = Item(str(batch["item_id"][i]), json.loads(batch["fields"][i]), str(batch["path"][i]),
                        int(batch["line"][i]))
            res = self.annotator.score_many([item.fields])[0]
            if isinstance(res, ContextOverflow):
                err = overflow_error(item, res)
                if self.on_error == "fail":
                    raise err
                lines.append(jsonl_line(error_record(err, self.stamp)))
            elif isinstance(res, Exception):
                raise res
            else:
                lines.append(jsonl_line(result_record(item.id, res, self.stamp)))
        return {"shard": batch["shard"], "seq": batch["seq"], "line_text": lines}


class ShardWriter:
    """OUT_DIR/part-NNNNN.{jsonl,parquet}, `per_shard` records each, every one renamed into place whole."""

    def __init__(self, out_dir: Path, fmt: str, per_shard: int, criteria: list[str]):
        self.out_dir, self.fmt, self.per_shard, self.criteria = out_dir, fmt, per_shard, criteria
        self.n_shards = 0
        self.records = 0
        self._buf: list[str] = []

    def add(self, line: str) -> None:
        self._buf.append(line)
        self.records += 1
        if len(self._buf) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        final = self.out_dir / f"part-{self.n_shards:05d}.{self.fmt}"
        tmp = final.with_name("." + final.name + ".partial")
        if self.fmt == "jsonl":
            with tmp.open("w", encoding="utf-8") as fh:
                fh.writelines(self._buf)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            recs = [json.loads(line) for line in self._buf]
            cols: dict[str, list[Any]] = {"id": [r.get("id") for r in recs],
                                          "record": [line.rstrip("\n") for line in self._buf]}
            for c in self.criteria:
                cols[f"label.{c}"] = [str(r["labels"][c]) if "labels" in r else None for r in recs]
                if any(c in r.get("scores", {}) for r in recs):  # rating scales: the score as a number
                    cols[f"score.{c}"] = [r.get("scores", {}).get(c) for r in recs]
            pq.write_table(pa.table(cols), tmp)
        os.replace(tmp, final)
        self.n_shards += 1
        self._buf = []


def run_ray_job(model: str | Path, inputs: list[str], out_dir: str | Path, *, spec_json: str, model_sha256: str,
                actors: int, threads: int, n_ctx: int = 2048, on_error: OnError = "fail",
                max_chars: int | None = None, ray_address: str | None = None, fmt: str = "jsonl",
                per_shard: int = 100_000, rows_per_batch: int = 16,
                progress: Callable[[int], None] | None = None, gpu_layers: int = 0,
                base: str | Path | None = None) -> dict[str, Any]:
    """Annotate INPUTS on Ray into OUT_DIR; returns the manifest it writes there. BASE: an adapter
    file's base GGUF where it is not beside it (a path every node can read)."""
    try:
        import ray
    except ImportError:
        raise RayJobError("--engine ray needs Ray: pip install 'edge-annotator[ray]'") from None
    from .spec import spec_from_json

    spec = spec_from_json(spec_json)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RayJobError(f"{out} exists and is not empty; the Ray engine writes a fresh folder of shards")
    if len(set(inputs)) != len(inputs):
        raise RayJobError("an input file is named twice")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size,
             ctx.raise_original_map_exception)
    ctx.execution_options.preserve_order = True  # records come back in input order
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True  # a bad record's InputError reaches the driver as itself
    # Small blocks (~rows_per_batch rows of a few hundred bytes): a shard's records spread over all
    # the actors, and results stream back while the job runs, instead of one block per shard.
    ctx.target_max_block_size = rows_per_batch * 512
    order = {p: i for i, p in enumerate(inputs)}
    stamp = {"model_sha256": model_sha256, "spec_sha256": spec.sha256}
    # Reading and parsing reserve no CPU: the actors may hold every core (--actors 2 --threads 1 on
    # two cores) and the reads must still run, or the pipeline waits forever.
    ds = ray.data.read_binary_files(inputs, include_paths=True, num_cpus=0)
    plan_fn: Any = _plan_shard
    ds = ds.flat_map(plan_fn, num_cpus=0, fn_kwargs={"spec_json": spec_json, "order": order, "on_error": on_error,
                                                     "max_chars": max_chars})
    # An actor that offloads layers asks Ray for one GPU share: the actors split the cluster's GPUs
    # evenly (two actors on one GPU: 0.5 each), so Ray places them only where a GPU is.
    gpus = 0.0
    if gpu_layers != 0:
        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        if n_gpus == 0:
            raise RayJobError("--gpu-layers: the Ray cluster has no GPU; leave --gpu-layers at 0 or add GPU nodes")
        gpus = 1.0 / math.ceil(actors / n_gpus)
    ds = ds.map_batches(
        _Scorer, batch_size=rows_per_batch, batch_format="numpy", num_cpus=threads, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model": str(Path(model).resolve()) if Path(model).exists() else str(model),
                               "spec_json": spec_json, "n_ctx": n_ctx, "threads": threads, "stamp": stamp,
                               "on_error": on_error, "gpu_layers": gpu_layers,
                               "base": str(Path(base).resolve()) if base else None})
    # Ray Data's actor pool defaults to max_restarts=-1 and max_task_retries=-1: a dead actor is
    # restarted and its batch re-run. An exception raised by our own code is not retried.
    writer = ShardWriter(out, fmt, per_shard, [c.name for c in spec.criteria])
    last = (-1, -1)
    errors = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for shard, seq, line in zip(batch["shard"], batch["seq"], batch["line_text"]):
                key = (int(shard), int(seq))
                if key <= last:
                    raise RayJobError(f"records came back out of order ({key} after {last}); refusing to write")
                last = key
                errors += '"error":{' in line
                writer.add(str(line))
                if progress:
                    progress(1)
    except Exception as e:  # Ray wraps our own errors (RayTaskError, UserCodeException): find them
        inner = _our_error(e)
        if inner is None:
            raise
        raise inner from None
    finally:
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size,
         ctx.raise_original_map_exception) = saved
    writer.flush()
    seconds = time.perf_counter() - t0
    manifest = {"inputs": inputs, "records": writer.records, "error_records": errors, "shards": writer.n_shards,
                "format": fmt, "actors": actors, "threads_per_actor": threads, "seconds": round(seconds, 2),
                **stamp}
    (out / "_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
