"""Task specs: what an annotator reads, which criteria it scores and which answers it may give.

A spec is YAML. It is validated as a whole and every problem is reported at once::

    from edge_annotator.runtime.spec import load_spec
    spec = load_spec("tasks/emobank.yaml")

A label set for single-label classification is held as one nominal criterion whose levels are
the labels, so the rest of the runtime deals only with criteria.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import SpecError
from .linear_head import Head
from .untrusted import JSONError, loads

Level = Literal["nominal", "ordinal", "interval"]
LEVELS: tuple[str, ...] = ("nominal", "ordinal", "interval")

# Placeholders an instruction template may use; anything else is a spec error.
TEMPLATE_FIELDS = frozenset({"rubric", "inputs", "name"})
CUE_FIELDS = frozenset({"criterion", "min", "max"})


@dataclass(frozen=True)
class InputField:
    name: str
    """Key of the field in each input record."""
    title: str
    """How the field is introduced in the prompt, e.g. 'Question'."""
    description: str = ""


@dataclass(frozen=True)
class ScaleLevel:
    value: int | str
    """The label written to the output: an integer on a rating scale, a class name for labels."""
    anchor: str
    """One line saying what this level means."""
    answer: str
    """The text the model emits for this level, right after the answer cue."""


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    level: Level
    scale: tuple[ScaleLevel, ...]
    judges: str = ""
    """The input field this criterion judges (a labelling tool points its control there); "" for
    the last input, what is usually judged (the reply, the summary, the answer)."""
    calibration: tuple[tuple[float, float], ...] = ()
    """A monotone map from the raw score to the human scale, as (raw, calibrated) knots joined by
    straight lines and flat beyond the ends; () is the identity. Fitted after training on the
    validation items (train/calibrate.py); annotate applies it to `scores`."""
    head: dict[str, Any] | None = None
    """A linear head on the model's hidden state at this criterion's cue, in place of the answer
    tokens' logits (runtime/linear_head.py); None for the answer-token route. Fitted on labelled
    items (export/heads.py)."""
    trust: dict[str, Any] | None = None
    """Which of this criterion's labels to accept without review: a threshold on the annotator's
    confidence with a bound on the accepted labels' disagreement with the experts, fitted on
    held-out items (runtime/trust.py); annotate marks each record's `accept` with it."""

    @property
    def values(self) -> list[int | str]:
        return [lv.value for lv in self.scale]

    @property
    def is_numeric(self) -> bool:
        return self.level != "nominal"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    inputs: tuple[InputField, ...]
    criteria: tuple[Criterion, ...]
    templates: tuple[str, ...]
    """Paraphrased instructions; templates[0] is the canonical one used at run time."""
    answer_cue: str
    """Line that asks for one criterion's answer, e.g. 'Valence (1-5):'."""
    kind: Literal["criteria", "labels"] = "criteria"
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (source, license); not used for prompting."""

    @property
    def input_names(self) -> list[str]:
        return [f.name for f in self.inputs]

    @property
    def criterion_names(self) -> list[str]:
        return [c.name for c in self.criteria]

    def judged_field(self, c: Criterion) -> str:
        """The input field criterion c judges: its `judges`, else the last input."""
        return c.judges or self.inputs[-1].name

    def criterion(self, name: str) -> Criterion:
        for c in self.criteria:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The canonical, JSON-able form; `from_dict(to_dict())` round-trips. A criterion's judges
        calibration, head and trust appear only when set, so specs without them hash as before."""
        d = asdict(self)
        for c in d["criteria"]:
            for k in ("judges", "calibration", "head", "trust"):
                if not c[k]:
                    del c[k]
            if "calibration" in c:
                c["calibration"] = [list(kn) for kn in c["calibration"]]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        """Hash of the canonical form: two specs that prompt and score alike hash alike."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


MAX_TEXT = 20_000
"""Characters in one template, cue, name, description or anchor: a spec may come from a GGUF file
anyone could have written, and its text goes into every prompt."""
MAX_TEMPLATES, MAX_INPUTS, MAX_CRITERIA, MAX_LEVELS = 64, 64, 64, 1000
MAX_JSON = 64 << 20
"""Characters of a spec's JSON (a GGUF's edge_annotator.spec): room for a linear head per criterion."""


def _placeholders(template: str) -> set[str]:
    """The placeholders of a template; ValueError for one with a format spec or conversion
    (`{rubric:>99999}` would allocate that width, `{name!r}` would render the repr)."""
    out = set()
    for _, f, fmt, conv in string.Formatter().parse(template):
        if f is None:
            continue
        if fmt or conv:
            raise ValueError(f"placeholder {{{f}}} takes no format spec or conversion "
                             f"(found {'!' + conv if conv else ''}{':' + fmt if fmt else ''})")
        out.add(f)
    return out


def _too_long(v: Any, where: str, problems: list[str]) -> bool:
    if isinstance(v, str) and len(v) > MAX_TEXT:
        problems.append(f"{where}: {len(v):,} characters, at most {MAX_TEXT:,}")
        return True
    return False


def parse_spec(raw: Any, source: str = "<spec>") -> TaskSpec:
    """Validate a spec given as plain data (from YAML or JSON); raise SpecError listing every problem."""
    if not isinstance(raw, dict):
        raise SpecError(source, ["the spec must be a mapping with keys name, inputs, criteria or labels, templates"])
    problems: list[str] = []
    known = {"name", "description", "inputs", "criteria", "labels", "templates", "answer_cue", "kind", "extra"}
    for key in sorted(set(raw) - known):
        problems.append(f"unknown key '{key}' (allowed: {', '.join(sorted(known))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or _too_long(name, "name", problems):
        problems.append("'name' must be a non-empty string")
        name = ""
    description = raw.get("description") or ""
    if not isinstance(description, str) or _too_long(description, "description", problems):
        problems.append("'description' must be text")
        description = ""
    inputs = _parse_inputs(raw.get("inputs"), problems)
    kind, criteria = _parse_criteria(raw, problems)
    templates = _parse_templates(raw.get("templates"), problems)
    cue = _parse_cue(raw.get("answer_cue", "{criterion}:"), problems)
    extra = raw.get("extra", {})
    if not isinstance(extra, dict):
        problems.append("'extra' must be a mapping")
        extra = {}
    names = {f.name for f in inputs}
    for c in criteria:
        if c.judges and names and c.judges not in names:
            problems.append(f"criterion '{c.name}': judges '{c.judges}', which is not an input "
                            f"(inputs: {', '.join(sorted(names))})")
    if problems:
        raise SpecError(source, problems)
    return TaskSpec(name=name, description=description, inputs=tuple(inputs),
                    criteria=tuple(criteria), templates=tuple(templates), answer_cue=cue,
                    kind=kind, extra=extra)  # type: ignore[arg-type]


def _parse_inputs(raw_inputs: Any, problems: list[str]) -> list[InputField]:
    inputs: list[InputField] = []
    if not isinstance(raw_inputs, list) or not raw_inputs or len(raw_inputs) > MAX_INPUTS:
        problems.append(f"'inputs' must be a list of 1 to {MAX_INPUTS} fields, e.g. [{{name: text, title: Sentence}}]")
        raw_inputs = []
    for i, f in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        if isinstance(f, str):
            f = {"name": f}
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            problems.append(f"{where}: needs a 'name'")
            continue
        for k in sorted(set(f) - {"name", "title", "description"}):
            problems.append(f"{where}: unknown key '{k}'")
        if any(_too_long(f.get(k), f"{where}.{k}", problems) for k in ("name", "title", "description")):
            continue
        if not all(isinstance(f.get(k, ""), str) for k in ("title", "description")):
            problems.append(f"{where}: 'title' and 'description' must be text")
            continue
        if f["name"] == "id":
            problems.append(f"{where}: 'id' is reserved for the item id")
        inputs.append(InputField(f["name"], str(f.get("title") or f["name"].replace("_", " ").capitalize()),
                                 str(f.get("description", ""))))
    names = [f.name for f in inputs]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"inputs: field '{dup}' appears more than once")
    return inputs


def _parse_criteria(raw: dict[str, Any], problems: list[str]) -> tuple[str, list[Criterion]]:
    """'criteria' (rating scales) or 'labels' (one nominal criterion): the kind and the criteria."""
    criteria: list[Criterion] = []
    has_c, has_l = "criteria" in raw, "labels" in raw
    kind = "criteria"
    if has_c == has_l:
        problems.append("give exactly one of 'criteria' (rating scales) or 'labels' (single-label classification)")
    elif has_c:
        raw_c = raw["criteria"]
        if not isinstance(raw_c, list) or not raw_c or len(raw_c) > MAX_CRITERIA:
            problems.append(f"'criteria' must be a list of 1 to {MAX_CRITERIA} criteria")
            raw_c = []
        for i, c in enumerate(raw_c):
            crit = _parse_criterion(c, f"criteria[{i}]", problems, numeric=True)
            if crit:
                criteria.append(crit)
    else:
        kind = "labels"
        lab = raw["labels"]
        if not isinstance(lab, dict):
            problems.append("'labels' must be a mapping with 'name', 'description' and 'classes'")
        else:
            c = {"name": lab.get("name", "label"), "description": lab.get("description", ""),
                 "level": "nominal", "scale": lab.get("classes")}
            for k in ("judges", "head", "trust"):
                if k in lab:
                    c[k] = lab[k]
            for k in sorted(set(lab) - {"name", "description", "classes", "judges", "head", "trust"}):
                problems.append(f"labels: unknown key '{k}'")
            crit = _parse_criterion(c, "labels", problems, numeric=False)
            if crit:
                criteria.append(crit)
    cnames = [c.name for c in criteria]
    for dup in sorted({n for n in cnames if cnames.count(n) > 1}):
        problems.append(f"criteria: '{dup}' appears more than once")
    return kind, criteria


def _parse_templates(templates: Any, problems: list[str]) -> list[str]:
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t.strip() for t in templates):
        problems.append("'templates' must be a non-empty list of instruction strings; the first is canonical")
        return []
    if len(templates) > MAX_TEMPLATES:
        problems.append(f"templates: {len(templates)} paraphrases, at most {MAX_TEMPLATES}")
        return []
    for i, t in enumerate(templates):
        if _too_long(t, f"templates[{i}]", problems):
            continue
        try:
            used = _placeholders(t)
        except ValueError as e:
            problems.append(f"templates[{i}]: {e} (write literal braces as {{{{ and }}}})")
            continue
        bad = used - TEMPLATE_FIELDS
        if bad:
            problems.append(f"templates[{i}]: unknown placeholder(s) {sorted(bad)}; allowed: {sorted(TEMPLATE_FIELDS)}")
        elif "rubric" not in used:
            problems.append(f"templates[{i}]: has no {{rubric}}: the prompt would never state the criteria and "
                            f"their scales")
    if len(set(templates)) != len(templates):
        problems.append("templates: paraphrases must differ from each other")
    return templates


def _parse_cue(cue: Any, problems: list[str]) -> str:
    if not isinstance(cue, str) or not cue.strip() or _too_long(cue, "answer_cue", problems):
        problems.append("'answer_cue' must be a non-empty string such as '{criterion} ({min}-{max}):'")
        return "{criterion}:"
    try:
        bad = _placeholders(cue) - CUE_FIELDS
        if bad:
            problems.append(f"answer_cue: unknown placeholder(s) {sorted(bad)}; allowed: {sorted(CUE_FIELDS)}")
    except ValueError as e:
        problems.append(f"answer_cue: {e}")
    return cue


def _parse_criterion(c: Any, where: str, problems: list[str], numeric: bool) -> Criterion | None:
    if not isinstance(c, dict):
        problems.append(f"{where}: must be a mapping with name, description, level and scale")
        return None
    name = c.get("name")
    for k in sorted(set(c) - {"name", "description", "level", "scale", "judges", "calibration", "head", "trust"}):
        problems.append(f"{where}: unknown key '{k}'")
    if not isinstance(name, str) or not name.strip() or _too_long(name, f"{where}.name", problems):
        problems.append(f"{where}: needs a non-empty 'name'")
        name = f"<{where}>"
    if not isinstance(c.get("description") or "", str) or _too_long(c.get("description"), f"{where}.description",
                                                                   problems):
        problems.append(f"{where}: 'description' must be text")
        return None
    where = f"{where} ({name})"
    level = c.get("level", "nominal" if not numeric else None)
    if level not in LEVELS:
        problems.append(f"{where}: 'level' must be one of {', '.join(LEVELS)}, got {level!r}")
    if not numeric and level != "nominal":
        problems.append(f"{where}: a label set is nominal")
    raw_scale = c.get("scale")
    key = "scale" if numeric else "classes"
    if not isinstance(raw_scale, list) or not 2 <= len(raw_scale) <= MAX_LEVELS:
        problems.append(f"{where}: '{key}' must list at least two levels (at most {MAX_LEVELS})")
        return None
    scale: list[ScaleLevel] = []
    for j, lv in enumerate(raw_scale):
        if isinstance(lv, str) and not numeric:
            lv = {"value": lv}
        if not isinstance(lv, dict) or "value" not in lv:
            problems.append(f"{where}: {key}[{j}] needs a 'value'")
            continue
        extra_keys = sorted(set(lv) - {"value", "anchor", "answer"})
        if extra_keys:
            problems.append(f"{where}: {key}[{j}] has unknown key(s) {extra_keys} (quote anchors that contain commas)")
        v = lv["value"]
        if numeric and (not isinstance(v, int) or isinstance(v, bool)):
            problems.append(f"{where}: {key}[{j}] value {v!r} must be an integer")
            continue
        if not numeric and not isinstance(v, str):
            problems.append(f"{where}: {key}[{j}] value {v!r} must be a string")
            continue
        anchor = lv.get("anchor", "")
        if any(_too_long(lv.get(k), f"{where}: {key}[{j}].{k}", problems) for k in ("value", "anchor", "answer")):
            continue
        if not isinstance(anchor, str):
            problems.append(f"{where}: {key}[{j}] 'anchor' must be text")
            continue
        if numeric and not anchor.strip():
            problems.append(f"{where}: {key}[{j}] (value {v}) needs a one-line 'anchor'")
        elif "\n" in str(anchor).strip():
            problems.append(f"{where}: {key}[{j}] anchor must be one line")
        answer = lv.get("answer", str(v))
        if not isinstance(answer, str) or not answer.strip():
            problems.append(f"{where}: {key}[{j}] 'answer' must be a non-empty string")
            continue
        scale.append(ScaleLevel(v, str(anchor).strip(), answer))
    values = [lv.value for lv in scale]
    if len(set(values)) != len(values):
        problems.append(f"{where}: values must be distinct")
    answers = [lv.answer for lv in scale]
    if len(set(answers)) != len(answers):
        problems.append(f"{where}: answers must be distinct")
    if numeric and values and values != sorted(values):
        problems.append(f"{where}: scale values must be listed in increasing order")
    judges = c.get("judges", "")
    if not isinstance(judges, str):
        problems.append(f"{where}: 'judges' must name an input field")
        judges = ""
    calibration = _parse_calibration(c.get("calibration", []), where, problems, numeric and level != "nominal")
    head = _parse_head(c.get("head"), where, problems, len(scale), numeric and level != "nominal")
    trust = _parse_trust(c.get("trust"), where, problems, numeric and level != "nominal")
    return Criterion(name=name, description=str(c.get("description") or "").strip(),
                     level=level if level in LEVELS else "nominal", scale=tuple(scale),  # type: ignore[arg-type]
                     judges=judges, calibration=calibration, head=head, trust=trust)


TRUST_NUMBERS = {"target": (0, 1), "delta": (0, 1), "tolerance": (0, 1e9), "threshold": (0, 1), "items": (0, 1e9),
                 "accepted": (0, 1e9), "disagree": (0, 1e9), "bound": (0, 1), "best_threshold": (0, 1),
                 "best_accepted": (0, 1e9), "best_disagree": (0, 1e9), "items_needed": (0, 1e12),
                 "coverage": (0, 1), "interval_q": (0, 1e9), "interval_floor": (0, 1e9),
                 "interval_items_needed": (0, 1e12), "set_q": (0, 1), "set_items_needed": (0, 1e12)}
"""A trust rule's numbers and their ranges (runtime/trust.py writes them); threshold,
items_needed, interval_q and set_q may be null (the rule promises nothing, or no interval or set
narrower than the scale). The interval keys come together, on rating scales only; the label set's
keys together, on labels only."""
INTERVAL_KEYS = ("interval_method", "coverage", "interval_q", "interval_floor", "interval_items_needed")
SET_KEYS = ("set_method", "coverage", "set_q", "set_items_needed")


def _parse_trust(raw: Any, where: str, problems: list[str], numeric: bool) -> dict[str, Any] | None:
    """A criterion's trust rule: the keys runtime/trust.py writes, numbers finite and in range."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        problems.append(f"{where}: 'trust' must be a mapping (method, target, delta, threshold, ...)")
        return None
    ok = True
    for k in sorted(set(raw) - set(TRUST_NUMBERS) - {"method", "items_sha256", "interval_method", "set_method"}):
        problems.append(f"{where}: trust: unknown key '{k}'")
        ok = False
    for k in ("method", "target", "delta", "tolerance", "threshold", "items", "bound"):
        if k not in raw:
            problems.append(f"{where}: trust: needs '{k}'")
            ok = False
    keys, what = (INTERVAL_KEYS, "a score interval") if numeric else (SET_KEYS, "a label set")
    if any(k in raw for k in keys) and not all(k in raw for k in keys):
        problems.append(f"{where}: trust: {what} needs all of {', '.join(keys)}")
        ok = False
    if not numeric and any(k in raw for k in set(INTERVAL_KEYS) - set(SET_KEYS)):
        problems.append(f"{where}: trust: score intervals are for rating scales, not labels")
        ok = False
    if numeric and any(k in raw for k in set(SET_KEYS) - set(INTERVAL_KEYS)):
        problems.append(f"{where}: trust: label sets are for labels, not rating scales")
        ok = False
    for k in ("method", "items_sha256", "interval_method", "set_method"):
        if k in raw and (not isinstance(raw[k], str) or len(raw[k]) > 200):
            problems.append(f"{where}: trust: '{k}' must be a short string")
            ok = False
    for k, (lo, hi) in TRUST_NUMBERS.items():
        v = raw.get(k)
        if v is None and k in ("threshold", "items_needed", "interval_q", "set_q") or k not in raw:
            continue
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
            problems.append(f"{where}: trust: '{k}' must be a number in [{lo:g}, {hi:g}], got {v!r}")
            ok = False
    return dict(raw) if ok else None


def _parse_head(raw: Any, where: str, problems: list[str], levels: int, scale: bool) -> dict[str, Any] | None:
    """A criterion's linear head, checked whole (shapes, finite numbers), in its canonical form."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{where}: 'head' must be a mapping (kind, dim, w, b; or members)")
        return None
    try:
        head = Head.from_dict(raw, levels)
    except ValueError as e:
        problems.append(f"{where}: head: {e}")
        return None
    if "ridge" in head.kinds and not scale:
        problems.append(f"{where}: a ridge head predicts a number: rating scales only")
        return None
    return head.to_dict()


def _parse_calibration(raw: Any, where: str, problems: list[str], scale: bool) -> tuple[tuple[float, float], ...]:
    """(raw, calibrated) knots, both increasing: a monotone piecewise-linear map."""
    if raw in (None, []):
        return ()
    ok = isinstance(raw, list) and len(raw) >= 2 and all(
        isinstance(k, list | tuple) and len(k) == 2 and all(isinstance(x, int | float) and not isinstance(x, bool)
                                                            for x in k) for k in raw)
    if not ok:
        problems.append(f"{where}: 'calibration' must list two or more [raw, calibrated] pairs of numbers")
        return ()
    if not scale:
        problems.append(f"{where}: 'calibration' applies to rating scales only")
        return ()
    knots = tuple((float(a), float(b)) for a, b in raw)
    xs, ys = [k[0] for k in knots], [k[1] for k in knots]
    if any(b <= a for a, b in zip(xs, xs[1:])) or any(b < a for a, b in zip(ys, ys[1:])):
        problems.append(f"{where}: 'calibration' raw values must increase and calibrated ones never decrease")
        return ()
    return knots


def load_spec(path: str | Path) -> TaskSpec:
    """Read and validate a YAML spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(p), ["file not found"]) from None
    except UnicodeDecodeError as e:
        raise SpecError(str(p), [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(p), [f"{loc}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    return parse_spec(raw, str(p))


def spec_from_json(text: str, source: str = "<embedded spec>") -> TaskSpec:
    """Inverse of TaskSpec.to_json, re-validated as a spec file is (the JSON may come from an
    untrusted file): any wrong shape is a SpecError, never another exception."""
    if not isinstance(text, str):
        raise SpecError(source, [f"must be JSON text, got {type(text).__name__}"])
    if len(text) > MAX_JSON:
        raise SpecError(source, [f"{len(text):,} characters of JSON, at most {MAX_JSON:,}"])
    try:
        raw = loads(text)
    except JSONError as e:
        raise SpecError(source, [f"not valid JSON: {e}"]) from None
    if isinstance(raw, dict) and raw.get("kind") == "labels":
        # the canonical form stores the label set as its single criterion
        crits = raw.get("criteria")
        if not isinstance(crits, list) or len(crits) != 1 or not isinstance(crits[0], dict):
            raise SpecError(source, ["'kind: labels' holds its label set as one criterion: 'criteria' must be a "
                                     "list of one mapping"])
        c = crits[0]
        raw = {**raw, "labels": {"name": c.get("name"), "description": c.get("description", ""),
                                 "classes": c.get("scale"),
                                 **{k: c[k] for k in ("judges", "head", "trust") if c.get(k)}}}
        raw.pop("criteria", None)
    return parse_spec(raw, source)
