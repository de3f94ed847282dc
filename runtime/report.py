"""`annotate-cli agree --report DIR`: an agreement report a reviewer can look at.

    report = build_report(spec, preds, humans, items, seed=0)     # numbers: DIR/report.json
    write_report(report, figures, DIR)                             # DIR/report.html, images inside

Per criterion: alpha with the human consensus for the label and (rating scales) the score, each
with a 95% bootstrap interval (items resampled, seed fixed: the same inputs give the same bytes);
the humans' own alpha and alpha with the model as one more rater, with intervals; a confusion
matrix (model label against the consensus); a reliability diagram with its expected calibration
error (the top label's probability for label sets; every level's probability against "the
consensus is this level" for rating scales); for rating scales the score against the consensus;
the 10 items where model and consensus disagree most, with their text; and which labels to trust
(runtime/trust.py): over confidence thresholds, the share of items the annotator would label alone
against the disagreement among them, the rule each target (5%, 10%, 20%) would get from these items,
and, where the annotator carries a rule, what it accepted here beside the bound it promised.

matplotlib and jinja2 (the `report` extra) are imported only here, only when a report is made.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .metrics import _alpha, _code, bootstrap, consensus, leave_one_out, nearest_level
from .records import Prediction
from .spec import Criterion, TaskSpec
from .trust import GRID, fit_rule, held_out, tolerance_of

RESAMPLES = 1000
BINS = 10
TARGETS = (0.05, 0.1, 0.2)
"""The disagreement targets the report shows the trust rule's trade-off at."""
DELTA = 0.1


def missing_extra() -> str | None:
    """What to install when the `report` extra is absent, else None."""
    import importlib.util

    try:
        if all(importlib.util.find_spec(m) is not None for m in ("matplotlib", "jinja2")):
            return None
    except ImportError:
        pass
    return "--report needs matplotlib and jinja2: pip install 'edge-annotator[report]'"


def _interval(stat: Any, n: int, seed: int) -> list[float | None]:
    lo, hi = bootstrap(stat, n, RESAMPLES, seed)
    return [lo, hi]


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def criterion_report(c: Criterion, preds: Sequence[Prediction], humans: Mapping[str, Sequence[Mapping[str, Any]]],
                     texts: Mapping[str, str], seed: int) -> dict[str, Any]:
    """Every figure of one criterion over the items that have both a prediction and human ratings."""
    rows = [(p, [r[c.name] for r in humans.get(p.id, []) if c.name in r]) for p in preds if p.error is None]
    rows = [(p, rs) for p, rs in rows if rs]
    out: dict[str, Any] = {"criterion": c.name, "level": c.level, "items": len(rows)}
    if not rows:
        return out
    n, max_r = len(rows), max(len(rs) for _, rs in rows)
    model = np.array([_code(c, p.labels[c.name]) for p, _ in rows])
    cons_v = [consensus(c, rs) for _, rs in rows]
    cons = np.array([_code(c, v) for v in cons_v])
    hum = np.array([[_code(c, rs[k]) if k < len(rs) else np.nan for _, rs in rows] for k in range(max_r)])

    def label_alpha(ix: np.ndarray) -> float | None:
        return _alpha([model[ix], cons[ix]], c.level)

    out["label_alpha"] = _r(label_alpha(np.arange(n)))
    out["label_alpha_ci"] = [_r(x) for x in _interval(label_alpha, n, seed)]
    if max_r >= 2:
        def humans_alpha(ix: np.ndarray) -> float | None:
            return _alpha(hum[:, ix].tolist(), c.level)

        def plus_model(ix: np.ndarray) -> float | None:
            return _alpha(np.vstack([hum[:, ix], model[ix]]).tolist(), c.level)

        out["humans_alpha"], out["humans_alpha_ci"] = _r(humans_alpha(np.arange(n))), \
            [_r(x) for x in _interval(humans_alpha, n, seed)]
        out["humans_plus_model_alpha"], out["humans_plus_model_alpha_ci"] = _r(plus_model(np.arange(n))), \
            [_r(x) for x in _interval(plus_model, n, seed)]
    if c.level != "nominal" and all(c.name in p.scores for p, _ in rows):
        score = np.array([p.scores[c.name] for p, _ in rows])
        mean = np.array([float(np.mean([float(v) for v in rs])) for _, rs in rows])

        def score_alpha(ix: np.ndarray) -> float | None:
            return _alpha([score[ix], mean[ix]], "interval")

        out["score_alpha"], out["score_alpha_ci"] = _r(score_alpha(np.arange(n))), \
            [_r(x) for x in _interval(score_alpha, n, seed)]
        out["scatter"] = {"score": score.round(6).tolist(), "consensus_mean": mean.round(6).tolist()}
        gap = np.abs(score - mean)
    else:
        p_cons = np.array([float(p.probs[c.name].get(str(nearest_level(c, v)), 0.0)) for (p, _), v in
                           zip(rows, cons_v)])
        gap = 1.0 - p_cons  # how little probability the model gave the consensus label
    levels = [str(v) for v in c.values]
    gold = [str(nearest_level(c, v)) for v in cons_v]
    pred = [str(p.labels[c.name]) for p, _ in rows]
    out["confusion"] = {"levels": levels, "counts": [[sum(1 for g, q in zip(gold, pred) if g == a and q == b)
                                                      for b in levels] for a in levels]}
    out["reliability"] = _reliability(c, [p for p, _ in rows], gold)
    scores = {p.id: p.scores[c.name] for p, _ in rows if c.name in p.scores}
    loo = leave_one_out(c, {p.id: p.labels[c.name] for p, _ in rows}, {p.id: rs for p, rs in rows},
                        scores if len(scores) == len(rows) else None, resamples=RESAMPLES, seed=seed)
    if loo is not None:
        out["leave_one_out"] = loo | {"sentence": yardstick_sentence(loo)}
    out["trust"] = trust_report(c, preds, humans)
    worst = np.argsort(-gap, kind="stable")[:10]
    out["disagreements"] = [{"id": rows[i][0].id, "text": texts.get(rows[i][0].id, ""), "model": pred[i],
                             "score": rows[i][0].scores.get(c.name), "consensus": _r(float(cons[i]))
                             if c.level != "nominal" else gold[i], "ratings": [str(v) for v in rows[i][1]],
                             "gap": _r(float(gap[i]))} for i in worst]
    return out


def trust_report(c: Criterion, preds: Sequence[Prediction],
                 humans: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Which of these labels the annotator could give alone: "disagree" as the trust rule counts it
    (off the raters' mean by more than half a scale step; for label sets, not the majority). The
    curve: per confidence threshold, the share of items at or above it and the disagreement among
    them. Per target, the rule fitted on these very items (so its rate here is in-sample; its bound
    is the promise for items like them). Where the records carry a stored rule's marks, what it
    accepted on these items and how often those disagree, beside the bound it promised."""
    tol = tolerance_of(c)
    rows = held_out(c, tol, preds, humans)
    n = len(rows)
    conf = np.array([r[1] for r in rows], dtype=float)
    wrong = np.array([r[2] for r in rows], dtype=bool)
    out: dict[str, Any] = {"tolerance": _r(tol), "items": n, "disagree_all": _r(float(wrong.mean())) if n else None}
    curve: list[dict[str, Any]] = []
    for t in (*GRID, 0.0):
        m = conf >= t
        if m.any() and (not curve or int(curve[-1]["accepted"]) < int(m.sum())):
            curve.append({"threshold": t, "accepted": int(m.sum()), "share": _r(float(m.mean())),
                          "disagree": _r(float(wrong[m].mean()))})
    out["curve"] = curve
    targets = []
    for target in TARGETS if n else ():
        rule = fit_rule(conf.tolist(), wrong.tolist(), target, DELTA, tol, [r[0] for r in rows])
        acc = rule["accepted"]
        targets.append({"target": target, "threshold": rule["threshold"], "share": _r(acc / n),
                        "disagree": _r(rule["disagree"] / acc) if acc else None, "bound": rule["bound"],
                        "items_needed": rule.get("items_needed")})
    out["targets"] = targets
    at10 = next((t for t in targets if t["target"] == 0.1), None)
    if at10 is not None:
        out["sentence"] = (f"At 10% disagreement (promised at {1 - DELTA:.0%}) the annotator labels "
                           f"{at10['share']:.0%} of these {n} items alone." if at10["threshold"] is not None else
                           f"At 10% disagreement the annotator can be promised nothing on these {n} items (lowest "
                           f"bound {at10['bound']:.3f}); about {at10['items_needed'] or 'many more'} accepted held-out "
                           f"items at its rate would do.")
    ids = {r[0] for r in rows}
    marked = [p for p in preds if p.error is None and p.id in ids and c.name in p.accept]
    if c.trust and marked:
        bad = {r[0] for r in rows if r[2]}
        acc_ids = [p.id for p in marked if p.accept[c.name]]
        out["stored"] = {"target": c.trust["target"], "delta": c.trust["delta"], "bound": c.trust["bound"],
                         "threshold": c.trust.get("threshold"), "items": len(marked),
                         "share": _r(len(acc_ids) / len(marked)),
                         "disagree": _r(sum(i in bad for i in acc_ids) / len(acc_ids)) if acc_ids else None}
    return out


def yardstick_sentence(loo: dict[str, Any]) -> str:
    """The like-for-like comparison in words."""
    def fig(key: str) -> str:
        ci = loo.get(f"{key}_ci")
        return f"{loo[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    verdict = {"above": "above an individual human's agreement", "below": "below an individual human's agreement",
               "within": "within an individual human's agreement"}.get(loo.get("verdict", ""),
                                                                         "not decided (too few items for intervals)")
    return (f"One held-out rater agrees with the consensus of the others at alpha {fig('human_alpha')}; the model's "
            f"{loo['model_figure']}, against the same consensus, at {fig('model_alpha')} ({loo['items']} items, "
            f"{loo['draws']} draws of the held-out rater): the model is {verdict}.")


def _reliability(c: Criterion, preds: Sequence[Prediction], gold: Sequence[str]) -> dict[str, Any]:
    """Binned confidence against accuracy, and the expected calibration error (|acc - conf| weighted by
    each bin's share). Label sets: the top label's probability, right when it is the consensus.
    Rating scales: every level's probability, right when that level is the consensus (classwise)."""
    conf: list[float] = []
    hit: list[float] = []
    for p, g in zip(preds, gold):
        probs = p.probs[c.name]
        if c.level == "nominal":
            top = str(p.labels[c.name])
            conf.append(float(probs[top]))
            hit.append(float(top == g))
        else:
            for lv, q in probs.items():
                conf.append(float(q))
                hit.append(float(lv == g))
    cf, ht = np.array(conf), np.array(hit)
    idx = np.minimum((cf * BINS).astype(int), BINS - 1)
    bins = []
    ece = 0.0
    for b in range(BINS):
        m = idx == b
        if m.any():
            bins.append({"bin": b, "count": int(m.sum()), "confidence": _r(cf[m].mean()),
                         "accuracy": _r(ht[m].mean())})
            ece += m.mean() * abs(float(cf[m].mean()) - float(ht[m].mean()))
    return {"kind": "top label" if c.level == "nominal" else "every level", "ece": _r(ece), "bins": bins}


def build_report(spec: TaskSpec, preds: Sequence[Prediction], humans: Mapping[str, Sequence[Mapping[str, Any]]],
                 texts: Mapping[str, str], seed: int = 0,
                 training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report's figures; `training` (fit's: items, steps, passes, seconds, ...) becomes a table
    of how the annotator was made, where the caller knows it."""
    rep = {"spec": spec.name, "seed": seed, "resamples": RESAMPLES, "records": len(preds),
           "error_records": sum(p.error is not None for p in preds),
           "criteria": [criterion_report(c, preds, humans, texts, seed) for c in spec.criteria]}
    if training:
        rep["training"] = dict(training)
    return rep


# -- figures and the page ----------------------------------------------------------------------

def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})  # no version or date: same bytes
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figures(crit: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    if "confusion" in crit:
        cm = np.array(crit["confusion"]["counts"])
        levels = crit["confusion"]["levels"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(levels), 1.0 + 0.35 * len(levels)))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(levels)), levels, rotation=90 if len(levels) > 8 else 0, fontsize=7)
        ax.set_yticks(range(len(levels)), levels, fontsize=7)
        ax.set_xlabel("model label")
        ax.set_ylabel("human consensus")
        if len(levels) <= 10:
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="black" if v < cm.max() / 2 else "white")
        ax.set_title(f"{crit['criterion']}: confusion")
        fig.tight_layout()
        out["confusion"] = _png(fig)
        rel = crit["reliability"]
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        conf = [b["confidence"] for b in rel["bins"]]
        acc = [b["accuracy"] for b in rel["bins"]]
        ax.plot(conf, acc, marker="o")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"predicted probability ({rel['kind']})")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"{crit['criterion']}: ECE {rel['ece']:.3f}")
        fig.tight_layout()
        out["reliability"] = _png(fig)
    if "scatter" in crit:
        sc = crit["scatter"]
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        ax.scatter(sc["consensus_mean"], sc["score"], s=8, alpha=0.6)
        lo = min(min(sc["score"]), min(sc["consensus_mean"]))
        hi = max(max(sc["score"]), max(sc["consensus_mean"]))
        ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
        ax.set_xlabel("human mean")
        ax.set_ylabel("model score")
        ax.set_title(f"{crit['criterion']}: score alpha {crit['score_alpha']:.3f}")
        fig.tight_layout()
        out["scatter"] = _png(fig)
    if (tr := crit.get("trust")) and tr.get("curve"):
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        ax.plot([x["share"] for x in tr["curve"]], [x["disagree"] for x in tr["curve"]], marker=".")
        for x in tr["targets"]:
            ax.axhline(x["target"], ls=":", color="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, max(0.25, max(x["disagree"] for x in tr["curve"]) * 1.05))
        ax.set_xlabel("share labelled alone (confidence >= threshold)")
        ax.set_ylabel("disagreement among them")
        ax.set_title(f"{crit['criterion']}: which labels to trust")
        fig.tight_layout()
        out["trust"] = _png(fig)
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Agreement report: {{ r.spec }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
.figs img { margin-right: 1em; vertical-align: top; }
</style></head>
<body>
<h1>Agreement report: {{ r.spec }}</h1>
<p>{{ r.records }} records ({{ r.error_records }} error records). Intervals: 95% bootstrap over items,
{{ r.resamples }} resamples, seed {{ r.seed }}.</p>
{% if r.training is defined %}{% set t = r.training %}
<h2>How the annotator was trained</h2>
<table>
<tr><td>training items</td><td>{{ t["items"] }}</td></tr>
<tr><td>steps made (planned for the budget)</td><td>{{ t.steps }} ({{ t.planned_steps }})</td></tr>
<tr><td>passes over the training items</td><td>{{ t.passes }}</td></tr>
<tr><td>training time (validation, merge and calibration included)</td>
<td>{{ t.minutes }} min (budget {{ t.budget_minutes }} min)</td></tr>
<tr><td>validation alpha, untrained &rarr; best (step {{ t.best_step }})</td>
<td>{{ fmt(t.val_alpha_untrained) }} &rarr; {{ fmt(t.val_alpha) }}</td></tr>
</table>{% endif %}
{% for c in r.criteria %}
<h2>{{ c.criterion }} ({{ c.level }}, {{ c["items"] }} items)</h2>
<table>
<tr><th>alpha with the human consensus</th><th>value</th><th>95% interval</th></tr>
{% for key, name in rows %}{% if c[key] is defined %}
<tr><td>{{ name }}</td><td>{{ fmt(c[key]) }}</td><td>{{ ci(c[key ~ "_ci"]) }}</td></tr>
{% endif %}{% endfor %}
</table>
{% if c.leave_one_out is defined %}
<p class="yardstick"><b>Like for like:</b> {{ c.leave_one_out.sentence }}</p>{% endif %}
<div class="figs">{% for name, src in figs[loop.index0].items() %}
<img alt="{{ c.criterion }} {{ name }}" src="{{ src }}">{% endfor %}</div>
{% if c.trust is defined and c.trust["items"] %}{% set t = c.trust %}
<h3>Which labels to trust without review</h3>
<p>Disagreeing: off the raters' consensus{% if c.level != "nominal" %} mean by more than {{ t.tolerance }}{% endif %};
{{ fmt(t.disagree_all) }} of all {{ t["items"] }} items. {% if t.sentence is defined %}{{ t.sentence }}{% endif %}</p>
<table><tr><th>rule</th><th>confidence &ge;</th><th>items labelled alone</th><th>disagreement among them (here)</th>
<th>promised bound</th></tr>
{% if t.stored is defined %}<tr>
<td>the annotator's rule (target {{ t.stored.target }}, these {{ t.stored["items"] }} items)</td>
<td>{{ fmt(t.stored.threshold) }}</td><td>{{ pct(t.stored.share) }}</td><td>{{ fmt(t.stored.disagree) }}</td>
<td>{{ fmt(t.stored.bound) }}</td></tr>{% endif %}
{% for x in t.targets %}<tr><td>target {{ pct(x.target) }}, fitted on these items</td><td>{{ fmt(x.threshold) }}</td>
<td>{{ pct(x.share) }}</td><td>{{ fmt(x.disagree) }}</td><td>{{ fmt(x.bound) }}</td></tr>
{% endfor %}</table>{% endif %}
{% if c.disagreements %}
<h3>Where model and consensus disagree most</h3>
<table><tr><th>id</th><th>text</th><th>model</th><th>score</th><th>consensus</th><th>ratings</th></tr>
{% for d in c.disagreements %}<tr><td>{{ d.id }}</td><td>{{ d.text }}</td><td>{{ d.model }}</td>
<td>{{ fmt(d.score) }}</td>
<td>{{ d.consensus }}</td><td>{{ d.ratings | join(", ") }}</td></tr>
{% endfor %}</table>{% endif %}
{% endfor %}
<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesRendered = ok + "/" + imgs.length;
});
</script>
</body></html>
"""

ROWS = [("label_alpha", "label"), ("score_alpha", "score (probability-weighted mean)"),
        ("humans_alpha", "humans among themselves"), ("humans_plus_model_alpha", "humans + the model as a rater")]


class ReportError(UserError, ValueError):
    """A report that cannot be made (the extra is missing, or the records lack probabilities)."""


def report_files(pred_path: str | Path, preds: Sequence[Prediction], human_path: str | Path,
                 humans: Mapping[str, Sequence[Mapping[str, Any]]], spec: TaskSpec, out_dir: str | Path,
                 seed: int = 0, training: Mapping[str, Any] | None = None, force: bool = False) -> Path:
    """agree --report's whole job: the report of `preds` (read from PRED_PATH) against `humans`
    (read from HUMAN_PATH, whose rows also give the texts), written to OUT_DIR; its HTML page.
    fit passes `training` (build_report) and `force` (the folder is its run's own); agree checks
    the folder against its inputs before any work (report_outputs)."""
    from .data import iter_rows

    if missing := missing_extra():
        raise ReportError(missing)
    if bare := next((p for p in preds if p.error is None and not p.probs), None):
        raise ReportError(f"{pred_path}:{bare.line}: --report needs each label's probability ('probs', as "
                          f"annotate-cli writes it); this record has labels only")
    texts = {}
    for row in iter_rows(human_path):
        if row.data is not None and "id" in row.data:
            texts[str(row.data["id"])] = " | ".join(str(row.data.get(f.name, "")) for f in spec.inputs)
    return write_report(build_report(spec, preds, humans, texts, seed, training), out_dir, force)


REPORT_FILES = ("report.json", "report.html")


def report_outputs(out_dir: str | Path, inputs: Sequence[str | Path] = (), force: bool = False) -> list[Path]:
    """DIR's report files, once it is clear that writing them loses nothing: neither is an input,
    and (unless FORCE) neither exists. OutputError naming the first that does."""
    from .files import check_output

    return [check_output(Path(out_dir) / name, inputs, force) for name in REPORT_FILES]


def write_report(report: dict[str, Any], out_dir: str | Path, force: bool = False) -> Path:
    """DIR/report.json and DIR/report.html (self-contained: the figures are inline PNGs), each
    written whole and renamed into place; existing ones replaced only with FORCE. jinja2 renders
    this module's own PAGE, autoescaped, and nothing else: never a template from a model."""
    import jinja2

    from .files import atomic_write

    as_json, as_html = report_outputs(out_dir, (), force)
    as_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(as_json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    figs = [figures(c) for c in report["criteria"]]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(PAGE).render(
        r=report, figs=figs, rows=ROWS,
        fmt=lambda v: "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v),
        ci=lambda v: "n/a" if not v or v[0] is None else f"[{v[0]:.3f}, {v[1]:.3f}]",
        pct=lambda v: "n/a" if v is None else f"{v:.0%}")
    return atomic_write(as_html, html)
