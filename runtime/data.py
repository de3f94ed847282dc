"""Reading items and human labels from JSONL or CSV, with errors that name file, line and field.

An item is a record with an ``id`` and the spec's input fields. Human labels come in either of two
shapes, and several records may share an id (one per rater):

    {"id": "s1", "text": "...", "labels": {"Valence": 4}, "rater": "r2"}        # one rating a record
    {"id": "s1", "text": "...", "ratings": [{"labels": {"Valence": 4}}, ...]}   # all raters at once

In CSV, criteria are columns (``Valence``), one rating a row, and ``rater`` is an optional column.
Readers stream: memory does not grow with the file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputError
from .spec import Criterion, TaskSpec
from .untrusted import JSONError, loads

RESERVED = frozenset({"id", "labels", "ratings", "rater"})


@dataclass(frozen=True)
class Row:
    """One record as read, before it is checked against a spec."""

    path: str
    line: int
    data: dict[str, Any] | None
    error: InputError | None = None


def _has_bad_bytes(s: str) -> bool:
    # surrogateescape maps undecodable bytes to U+DC80..U+DCFF
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _check_text(v: Any, path: str, line: int, field: str) -> InputError | None:
    if isinstance(v, str) and _has_bad_bytes(v):
        return InputError(path, line, "is not valid UTF-8; re-encode the file as UTF-8", field)
    return None


def file_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".parquet":
        return "parquet"
    raise InputError(str(path), None, f"unknown file type '{suffix}': use .jsonl, .csv or .parquet")


def iter_rows(path: str | Path, stream: BinaryIO | None = None) -> Iterator[Row]:
    """Yield every record with its line number; malformed lines come back as rows with an error.

    `stream`, when given, is the file's content (the Ray path reads shards as bytes); `path` then
    only names the file in messages and picks the format.
    """
    p = Path(path)
    if stream is None and not p.exists():
        raise InputError(str(p), None, "file not found")
    fmt = file_format(p)
    if fmt == "parquet":
        return _iter_parquet(str(path), stream)
    return _iter_jsonl(str(path), stream) if fmt == "jsonl" else _iter_csv(str(path), stream)


@contextlib.contextmanager
def _open_binary(name: str, stream: BinaryIO | None) -> Iterator[BinaryIO]:
    if stream is not None:
        yield stream
    else:
        with open(name, "rb") as fh:
            yield fh


def _iter_jsonl(name: str, stream: BinaryIO | None) -> Iterator[Row]:
    with _open_binary(name, stream) as fh:
        for lineno, raw in enumerate(fh, 1):
            text = raw.decode("utf-8", errors="surrogateescape")
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            if _has_bad_bytes(text):
                yield Row(name, lineno, None,
                          InputError(name, lineno, "is not valid UTF-8; re-encode the file as UTF-8"))
                continue
            try:
                data = loads(text)
            except JSONError as e:
                yield Row(name, lineno, None, InputError(name, lineno, str(e)))
                continue
            if not isinstance(data, dict):
                yield Row(name, lineno, None,
                          InputError(name, lineno, f"expected a JSON object, got {type(data).__name__}"))
                continue
            yield Row(name, lineno, data)


MAX_CSV_FIELD = 1 << 24
"""Characters a CSV field may hold (Python's csv module stops at 131,072 by default; a long
document is a real input, so the limit is 16 Mi characters, and one over it is named as such)."""


def _csv_error(e: csv.Error) -> str:
    if "field larger than field limit" in str(e):
        return f"a field is longer than {MAX_CSV_FIELD:,} characters"
    return f"malformed CSV: {e}"


def _iter_csv(name: str, stream: BinaryIO | None) -> Iterator[Row]:
    delim = "\t" if name.lower().endswith(".tsv") else ","
    csv.field_size_limit(MAX_CSV_FIELD)
    with _open_binary(name, stream) as raw_fh:
        fh = io.TextIOWrapper(raw_fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(fh, delimiter=delim, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise InputError(name, 1, f"header: {_csv_error(e)}") from None
        if any(_has_bad_bytes(h) for h in header):
            raise InputError(name, 1, "header is not valid UTF-8")
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Row(name, start, None, InputError(name, start, _csv_error(e)))
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield Row(name, line, None, InputError(
                    name, line, f"has {len(cells)} columns, the header has {len(header)}"))
                continue
            yield Row(name, line, dict(zip(header, cells)))


def _iter_parquet(name: str, stream: BinaryIO | None) -> Iterator[Row]:
    """Parquet rows, streamed a record batch at a time; 'line' is the 1-based row number."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(name, None, "reading Parquet needs pyarrow: pip install 'edge-annotator[ray]'") from None
    try:
        pf = pq.ParquetFile(stream if stream is not None else name)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a damaged file
        raise InputError(name, None, f"not a readable Parquet file: {e}") from None
    n = 0
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            recs = batch.to_pylist() if batch is not None else []
        except Exception as e:  # a damaged row group, or a column pyarrow cannot turn into Python values
            raise InputError(name, n + 1, f"not a readable Parquet row group: {e}") from None
        if batch is None:
            return
        for rec in recs:
            n += 1
            yield Row(name, n, rec)


Value = int | float | str
"""A criterion's value as a rater or the spec writes it."""


@dataclass(frozen=True)
class Item:
    """One item to annotate, score or learn from: the one Item of the runtime, training and parity."""

    id: str
    fields: dict[str, str]
    """The spec's input fields, checked."""
    path: str
    """The file it came from, and its 1-based line (a row number for Parquet): errors name them."""
    line: int
    ratings: list[dict[str, Value]] = field(default_factory=list)
    """Human ratings (criterion -> value), one mapping per rater; empty for items to annotate."""


def record_id(row: Row, why: str = "every record needs an 'id'") -> str:
    """A record's id as text: a non-empty string or an integer; InputError naming the line otherwise."""
    if row.error:
        raise row.error
    assert row.data is not None
    raw_id = row.data.get("id")
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        raise InputError(row.path, row.line, f"missing: {why}", "id")
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise InputError(row.path, row.line, f"must be a string or an integer, got {type(raw_id).__name__}", "id")
    if isinstance(raw_id, str) and (_has_bad_bytes(raw_id) or "\x00" in raw_id):
        raise InputError(row.path, row.line, "is not valid text (invalid UTF-8 or a NUL character)", "id")
    return str(raw_id)


def check_item(row: Row, spec: TaskSpec, max_chars: int | None = None) -> Item:
    """The item in a row, checked against the spec; raises InputError naming the field at fault."""
    if row.error:
        raise row.error
    assert row.data is not None
    d, path, line = row.data, row.path, row.line
    item_id = record_id(row)
    fields: dict[str, str] = {}
    for f in spec.inputs:
        if f.name not in d:
            have = ", ".join(sorted(str(k) for k in d if k not in RESERVED)) or "none"
            raise InputError(path, line, f"missing (the spec '{spec.name}' needs {', '.join(spec.input_names)}; "
                             f"this record has {have})", f.name, item_id)
        fields[f.name] = text_value(d[f.name], path, line, f.name, item_id, max_chars)
    return Item(item_id, fields, path, line)


def text_value(v: Any, path: str, line: int | None, field: str, item_id: str | None = None,
               max_chars: int | None = None) -> str:
    """An input field's value as the text the model reads (a number is its decimal text); InputError
    where it is no text (a list, an object, a boolean), not valid UTF-8, holds a NUL, is empty or
    is longer than MAX_CHARS."""
    if v is None:
        v = ""
    if isinstance(v, int | float) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise InputError(path, line, f"must be text, got {type(v).__name__}", field, item_id)
    if err := _check_text(v, path, line or 0, field):
        raise InputError(path, line, err.reason, field, item_id)
    if "\x00" in v:
        raise InputError(path, line, "contains a NUL character", field, item_id)
    if not v.strip():
        raise InputError(path, line, "is empty", field, item_id)
    if max_chars is not None and len(v) > max_chars:
        raise InputError(path, line, f"is {len(v):,} characters long; the limit is {max_chars:,}", field, item_id)
    return v


def coerce_label(v: Any, c: Criterion, path: str, line: int, where: str) -> int | float | str:
    field = f"{where}.{c.name}"
    if c.level == "nominal":
        if isinstance(v, int) and not isinstance(v, bool) and not all(isinstance(x, int) for x in c.values):
            raise InputError(path, line, f"{v!r} is not a class of '{c.name}'", field)
        if str(v) in {str(x) for x in c.values}:
            return next(x for x in c.values if str(x) == str(v))
        raise InputError(path, line, f"{v!r} is not one of the spec's classes for '{c.name}'", field)
    try:
        num = float(v) if isinstance(v, str) else v
        if isinstance(num, bool) or not isinstance(num, int | float) or math.isnan(num):
            raise TypeError
    except (TypeError, ValueError):
        raise InputError(path, line, f"{v!r} is not a number on the scale of '{c.name}'", field) from None
    lo, hi = c.values[0], c.values[-1]
    assert isinstance(lo, int) and isinstance(hi, int)
    if not lo <= num <= hi:
        raise InputError(path, line, f"{v!r} is outside the scale {lo}..{hi} of '{c.name}'", field)
    if c.level == "ordinal" and num not in c.values:
        raise InputError(path, line, f"{v!r} is not a level of the ordinal scale {c.values}", field)
    return int(num) if float(num).is_integer() else float(num)


def ratings_of(row: Row, spec: TaskSpec) -> list[dict[str, Value]]:
    """The human ratings in a row (possibly none), each a mapping criterion -> value."""
    if row.error:
        raise row.error
    assert row.data is not None
    d, path, line = row.data, row.path, row.line
    names = {c.name for c in spec.criteria}
    if "ratings" in d:
        raw = d["ratings"]
        if not isinstance(raw, list):
            raise InputError(path, line, "must be a list of {labels: {...}}", "ratings")
        blocks = [(r.get("labels") if isinstance(r, dict) else None, f"ratings[{i}].labels") for i, r in enumerate(raw)]
    elif "labels" in d:
        blocks = [(d["labels"], "labels")]
    else:
        # CSV (or flat JSONL): criteria as columns
        flat = {k: v for k, v in d.items() if k in names and v not in ("", None)}
        blocks = [(flat, "")] if flat else []
    out = []
    for labels, where in blocks:
        if not isinstance(labels, dict):
            raise InputError(path, line, "must be a mapping criterion -> value", where or "labels")
        unknown = sorted(set(labels) - names)
        if unknown:
            raise InputError(path, line, f"unknown criteria {unknown}; the spec has {sorted(names)}", where or "labels")
        rating = {}
        for c in spec.criteria:
            if c.name in labels and labels[c.name] not in ("", None):
                rating[c.name] = coerce_label(labels[c.name], c, path, line, where or "labels")
        if rating:
            out.append(rating)
    return out


def read_human(path: str | Path, spec: TaskSpec) -> dict[str, list[dict[str, int | float | str]]]:
    """id -> every human rating of that item, in file order. Raises on the first bad record, and
    on a file in which no record holds a rating of the spec's criteria (Coverage)."""
    out: dict[str, list[dict[str, int | float | str]]] = {}
    seen = Coverage(str(path), spec)
    for row in iter_rows(path):
        if row.error:
            raise row.error
        assert row.data is not None
        item_id = record_id(row)
        rs = ratings_of(row, spec)
        seen.add(row.data, rs)
        out.setdefault(item_id, []).extend(rs)
    seen.check()
    return out


LAYOUTS = ("a column (CSV) or key (JSONL) per criterion, one rating a row, with an optional 'rater'; "
           "\"labels\": {criterion: value}; or \"ratings\": [{\"rater\": ..., \"labels\": {...}}]")


class Coverage:
    """What a human-label file held, so that a file read as nothing stops instead of giving 0 items.

    A file whose records map to no criterion value (one column per rater, a misspelt criterion
    column, labels under another key) raises one InputError naming the file, the columns found,
    the spec's criteria and the layouts accepted. check(strict=True), as training uses, also
    refuses a file in which one criterion has no rating at all."""

    def __init__(self, path: str, spec: TaskSpec):
        self.path, self.spec = path, spec
        self.records = self.rated = 0
        self.per_criterion = dict.fromkeys(spec.criterion_names, 0)
        self.columns: dict[str, None] = {}

    def add(self, data: dict[str, Any], ratings: list[dict[str, Value]]) -> None:
        self.records += 1
        self.rated += bool(ratings)
        if len(self.columns) < 200:
            self.columns.update(dict.fromkeys(data))
        for r in ratings:
            for k in r:
                self.per_criterion[k] += 1

    def check(self, strict: bool = False) -> None:
        names = self.spec.criterion_names
        if not self.records:
            raise InputError(self.path, None, "holds no records (the file is empty or blank)")
        missing = [c for c, n in self.per_criterion.items() if n == 0]
        if self.records and (not self.rated or (strict and missing)):
            what = (f"none of its {self.records:,} records holds a rating of the spec's criteria" if not self.rated
                    else f"no record rates {', '.join(repr(c) for c in missing)}")
            raise InputError(self.path, None, f"{what} (spec '{self.spec.name}': {', '.join(names)}). Columns found: "
                             f"{', '.join(self.columns) or 'none'}.{self._hint(missing or names)} Accepted layouts: "
                             f"{LAYOUTS}")

    def _hint(self, wanted: list[str]) -> str:
        import difflib

        cols = [c for c in self.columns if c not in RESERVED]
        wide = [c for c in cols for n in wanted if c.lower() != n.lower() and
                (c.lower().startswith(n.lower()) or c.lower().endswith(n.lower()))]
        if wide:
            return (f" {', '.join(wide[:4])} look like one column per rater: annotate-cli data reshape "
                    f"{Path(self.path).name} --spec SPEC -o labels.jsonl turns them into one rating a row.")
        close = [f"'{m[0]}' for '{n}'" for n in wanted if (m := difflib.get_close_matches(n, cols, 1, 0.6))]
        if close:
            return f" Misspelt? {', '.join(close)}."
        if "labels" not in self.columns and "ratings" not in self.columns and any(
                isinstance(k, str) and k.lower() in ("scores", "label", "annotations", "rating") for k in cols):
            return " Labels must sit under 'labels' (or 'ratings'), keyed by criterion name."
        return ""
