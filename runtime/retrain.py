"""The experts' labels coming back through `serve`'s webhook, and the retrain rounds they start.

    sink = LabelSink(Path("labels-back.jsonl"), spec)   # checked (and its folder made) before serving
    sink.append(records)                                 # the webhook's records, each a full item
    retrainer = Retrainer(swap_to, opts, spec)          # --retrain-after N
    retrainer.add(len(records))                          # every N labels: a round in the background

A round writes its labels as JSONL through the project's reader and writer (--retrain-with in any
layout `fit` reads, then the webhook's), runs --retrain-command, and hands the new file to
`swap_to` once the command exits 0 and the file loads. Whatever goes wrong in a round, it ends as
"failed" in /health and /stats, the old model keeps answering, and the next round can run.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import string
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .data import InputError, Row, check_item, iter_rows, ratings_of
from .errors import OutputError, UserError
from .files import atomic_write
from .labels import label_records
from .records import jsonl_line
from .serve_scorer import Scorer, ServeOptions
from .spec import TaskSpec

log = logging.getLogger(__name__)

PLACEHOLDERS = ("spec", "labels", "output")


class LabelSink:
    """--labels-out: the human-label JSONL the webhook appends to. Checked before the server listens:
    its folder is made, and a file already there must be human-label JSONL of this spec (a file
    it wrote before), so that appending can never spoil another file."""

    def __init__(self, path: Path, spec: TaskSpec):
        self.path, self.spec = path, spec
        self.lock = threading.Lock()
        if path.suffix.lower() != ".jsonl":
            raise OutputError(f"--labels-out {path}: the webhook writes JSONL; give a .jsonl file")
        if path.is_dir():
            raise OutputError(f"--labels-out {path}: is a folder; give a .jsonl file")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            with path.open("rb") as fh:
                fh.seek(-1, 2)
                if fh.read(1) != b"\n":
                    raise OutputError(f"--labels-out {path}: its last line is unterminated; it is not a file "
                                      f"this server wrote whole. Give another file")
            for row in iter_rows(path):
                try:
                    check_item(row, spec)
                    ratings_of(row, spec)
                except InputError as e:
                    raise OutputError(f"--labels-out {path} holds something other than human labels of spec "
                                      f"'{spec.name}' ({e}); give another file") from None
        with path.open("a", encoding="utf-8"):  # writable here and now, not at the first webhook
            pass

    def check(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records as they will be written, each read back as `train` reads a label file's row:
        an InputError (field type, NUL, level) here means nothing is written."""
        out = list(records)
        for r in out:
            row = Row("webhook", 1, r)
            check_item(row, self.spec)
            ratings_of(row, self.spec)
        return out

    def append(self, records: list[dict[str, Any]]) -> int:
        with self.lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(jsonl_line(r) for r in records))
            fh.flush()
        return len(records)


def command_template(command: str) -> list[str]:
    """--retrain-command split into arguments, refused (UserError) where it names a placeholder
    other than {spec}, {labels} and {output} or cannot be split."""
    try:
        args = shlex.split(command)
    except ValueError as e:
        raise UserError(f"--retrain-command: {e}") from None
    if not args:
        raise UserError("--retrain-command is empty")
    for a in args:
        try:
            names = {f for _, f, fmt, conv in string.Formatter().parse(a) if f is not None}
        except ValueError as e:
            raise UserError(f"--retrain-command: {a!r}: {e} (write literal braces as {{{{ and }}}})") from None
        bad = sorted(names - set(PLACEHOLDERS))
        if bad:
            raise UserError(f"--retrain-command: unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)}; "
                            f"it may use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    return args


class Retrainer:
    """--retrain-after N: after every N new labels, --retrain-command in the background on the
    earlier labels (--retrain-with) plus the webhook's; when it exits 0 and its file loads, `swap_to`
    gets the new Scorer. The old model serves until then; a failed round keeps it."""

    def __init__(self, swap_to: Callable[[Scorer], None], opts: ServeOptions, spec: TaskSpec):
        assert opts.labels_out is not None and opts.retrain_after is not None and opts.spec is not None
        self.swap_to, self.opts, self.spec = swap_to, opts, spec
        self.args = command_template(opts.retrain_command)
        if opts.retrain_with is not None:
            sum(1 for _ in label_records(opts.retrain_with, spec))  # every record checked before serving
        self.dir = opts.retrain_dir or opts.labels_out.with_name(opts.labels_out.stem + "-retrain")
        self.new_labels = 0
        self.rounds: list[dict[str, Any]] = []
        self.running: threading.Thread | None = None
        self.lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"after": self.opts.retrain_after, "new_labels": self.new_labels,
                    "running": self.running is not None, "rounds": [dict(r) for r in self.rounds]}

    def add(self, n: int) -> None:
        with self.lock:
            self.new_labels += n
            self._maybe_start()

    def _maybe_start(self) -> None:
        assert self.opts.retrain_after is not None
        if self.running is not None or self.new_labels < self.opts.retrain_after:
            return
        self.new_labels = 0
        k = len(self.rounds) + 1
        rnd: dict[str, Any] = {"round": k, "state": "running", "dir": str(self.dir / f"round-{k}")}
        self.rounds.append(rnd)
        self.running = threading.Thread(target=self._round, args=(rnd,), name=f"retrain-{k}", daemon=True)
        self.running.start()

    def _round(self, rnd: dict[str, Any]) -> None:
        try:
            self._run_round(rnd)
        except Exception as e:  # anything at all: the round is over, recorded as failed
            eid = secrets.token_hex(4)
            log.exception("retrain round %d failed (error %s)", rnd["round"], eid)
            rnd.update(state="failed", error=f"{type(e).__name__}: {e}"[:500], error_id=eid)
        finally:
            with self.lock:
                self.running = None
                self._maybe_start()

    def _run_round(self, rnd: dict[str, Any]) -> None:
        assert self.opts.labels_out is not None
        folder = Path(rnd["dir"])
        folder.mkdir(parents=True, exist_ok=True)
        labels, output = folder / "labels.jsonl", folder / "annotator.gguf"
        records: list[dict[str, Any]] = []
        for src in (self.opts.retrain_with, self.opts.labels_out):  # the earlier labels, then the webhook's
            if src is not None:  # gone since the start: the round fails, never trains on part of the labels
                records.extend(label_records(src, self.spec))
        atomic_write(labels, "".join(jsonl_line(r) for r in records))
        rnd["labels"] = len(records)
        cmd = [a.format(spec=self.opts.spec, labels=labels, output=output) for a in self.args]
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
            except UserError as e:  # a file that does not load: keep serving the old one
                rnd["error"] = str(e)[:500]
        elif rc == 0:
            rnd["error"] = f"the command exited 0 but wrote no {output}"
        if new is None:
            rnd["state"] = "failed"
            rnd["log_tail"] = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
            log.warning("retrain round %d failed (exit %d): %s", rnd["round"], rc, folder / "log.txt")
            return
        self.swap_to(new)
        rnd["state"] = "serving"
        rnd["model_version"] = new.model_version
