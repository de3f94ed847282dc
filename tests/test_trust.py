"""The trust rule (runtime/trust.py): it keeps its promise on items with known error rates, says so
when it cannot promise, is the same rule byte for byte, and travels in the spec to annotate's
records, select and the command that writes it."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DATA, TASKS
from test_serve import _call, server

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.errors import SpecError
from edge_annotator.runtime.spec import load_spec, spec_from_json
from edge_annotator.runtime.trust import (
    GRID,
    binom_cdf,
    describe,
    fit_interval,
    fit_rule,
    fit_set,
    interval,
    interval_floor,
    items_needed,
    label_set,
    majority_prob,
    spread,
    upper_bound,
)

SLOPE = 0.6
"""The synthetic items' error: P(disagree | confidence c) = SLOPE * (1 - c), c uniform on [0, 1], so
the rate among items with c >= t is SLOPE * (1 - t) / 2, known exactly."""


def _items(n: int, rng: random.Random) -> tuple[list[float], list[bool]]:
    conf = [rng.random() for _ in range(n)]
    return conf, [rng.random() < SLOPE * (1 - c) for c in conf]


def test_binomial_tail_and_bound_match_the_direct_sums() -> None:
    for n, k, p in [(10, 3, 0.2), (50, 0, 0.1), (200, 17, 0.1), (7, 7, 0.5), (1000, 80, 0.1)]:
        direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binom_cdf(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-300)
    # the upper bound is the rate at which k of n is as unlikely as the level allows
    u = upper_bound(5, 100, 0.01)
    assert binom_cdf(5, 100, u) == pytest.approx(0.01, rel=1e-6) and 0.05 < u < 0.2
    assert upper_bound(0, 0, 0.01) == 1.0


@pytest.mark.parametrize("target,delta,n", [(0.2, 0.1, 400), (0.1, 0.1, 2000), (0.05, 0.05, 5000), (0.3, 0.2, 150)])
def test_the_rule_keeps_its_promise_over_many_draws_of_held_out_items(target: float, delta: float, n: int) -> None:
    """Over 400 draws of N held-out items, the accepted items' true disagreement rate exceeds the
    target in at most a delta share of the draws (Monte Carlo slack aside), and the rule accepts a
    useful share: a rule that accepted nothing would keep the promise and fail here. Its stated
    bound is never above the target."""
    rng = random.Random(1234)
    fails, shares = 0, []
    for _ in range(400):
        conf, wrong = _items(n, rng)
        rule = fit_rule(conf, wrong, target, delta, 0.5)
        t = rule["threshold"]
        if t is None:
            shares.append(0.0)
            continue
        assert rule["bound"] <= target and rule["disagree"] <= rule["accepted"] * target
        fails += SLOPE * (1 - t) / 2 > target
        shares.append(1 - t)
    assert fails / 400 <= delta + 3 * math.sqrt(delta * (1 - delta) / 400), fails
    oracle = 2 * target / SLOPE  # the share of items with confidence >= the loosest threshold at the target
    assert sum(shares) / 400 >= 0.25 * oracle, (sum(shares) / 400, oracle)


def test_the_rule_is_the_same_byte_for_byte_and_does_not_depend_on_the_items_order() -> None:
    conf, wrong = _items(300, random.Random(7))
    ids = [f"i{k}" for k in range(300)]
    a = fit_rule(conf, wrong, 0.2, 0.1, 0.5, ids)
    order = list(range(300))
    random.Random(8).shuffle(order)
    b = fit_rule([conf[i] for i in order], [wrong[i] for i in order], 0.2, 0.1, 0.5, [ids[i] for i in order])
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["threshold"] in GRID


def test_too_few_items_accept_nothing_and_say_how_many_would_do() -> None:
    conf, wrong = _items(40, random.Random(3))
    rule = fit_rule(conf, wrong, 0.05, 0.1, 0.5)
    assert rule["threshold"] is None and rule["accepted"] == 0
    assert rule["bound"] > 0.05 and rule["items_needed"] is None or rule["items_needed"] > rule["best_accepted"]
    with pytest.raises(ValueError):
        fit_rule(conf, wrong, 1.5, 0.1, 0.5)


def test_the_items_needed_are_close_to_the_fewest_that_show_the_target() -> None:
    level = 0.1 / len(GRID)

    def enough(n: int, rate: float) -> bool:
        return binom_cdf(math.floor(rate * n), n, 0.1) <= level

    for rate in (0.0, 0.02, 0.05, 0.08):
        n = items_needed(rate, 0.1, level)
        assert n is not None and enough(n, rate), rate
        first = next(m for m in range(1, n + 1) if enough(m, rate))  # where the test first passes
        assert n <= 1.15 * first, (rate, n, first)  # (doubling alone: up to 2x)
    assert items_needed(0.1, 0.1, level) is None and items_needed(0.0999999, 0.1, level, limit=10_000) is None
    far = items_needed(0.099, 0.1, level)  # past the last power of two below the limit, not past the limit
    assert far is not None and 524_288 < far <= 1_000_000 and enough(far, 0.099)


def test_a_rule_travels_in_the_spec_and_a_bad_one_is_refused() -> None:
    from dataclasses import replace

    spec = load_spec(TASKS / "emobank.yaml")
    conf, wrong = _items(300, random.Random(5))
    rule = fit_rule(conf, wrong, 0.1, 0.1, 0.5, [str(i) for i in range(300)])
    with_rule = replace(spec, criteria=(replace(spec.criteria[0], trust=rule), *spec.criteria[1:]))
    back = spec_from_json(with_rule.to_json())
    assert back == with_rule and back.sha256 != spec.sha256
    assert spec_from_json(spec.to_json()).sha256 == spec.sha256  # no rule: the hash as before
    raw = json.loads(with_rule.to_json())
    for bad in ({**rule, "threshold": 2}, {**rule, "nonsense": 1}, {k: v for k, v in rule.items() if k != "target"},
                {**rule, "bound": float("nan")}, "accept everything"):
        raw["criteria"][0]["trust"] = bad
        with pytest.raises(SpecError):
            spec_from_json(json.dumps(raw))


def _rated(n: int, rng: random.Random) -> list[tuple[float, dict[str, float], float]]:
    """N synthetic rating-scale items (levels 1..5): (score, probabilities, raters' mean). The
    annotator's probabilities spread with a width of its own per item, and the raters' mean lies off
    its score by noise of about that width: a spread that says where the annotator is unsure."""
    out = []
    for _ in range(n):
        centre, width = rng.uniform(1.5, 4.5), rng.uniform(0.2, 1.2)
        w = [math.exp(-((v - centre) / width) ** 2 / 2) for v in range(1, 6)]
        probs = {str(v): x / sum(w) for v, x in zip(range(1, 6), w)}
        score = sum(v * probs[str(v)] for v in range(1, 6))
        out.append((score, probs, min(5.0, max(1.0, score + rng.gauss(0, spread(probs))))))
    return out


@pytest.mark.parametrize("coverage,n", [(0.9, 200), (0.8, 60), (0.95, 500)])
def test_score_intervals_hold_the_raters_mean_as_often_as_they_promise(coverage: float, n: int) -> None:
    """Split conformal: over 300 draws of N held-out items, the share of new items whose raters'
    mean lies in its interval averages at least COVERAGE and at most COVERAGE + 1 / (N + 1) (Monte
    Carlo slack aside). The spread buys narrower intervals than one width for every item would at the
    same coverage (a q fitted on ratios of 1: the plain split conformal interval)."""
    spec = load_spec(TASKS / "emobank.yaml")
    c = spec.criteria[0]
    rng = random.Random(99)
    covered, width, plain_width = [], [], []
    for _ in range(300):
        cal, new = _rated(n, rng), _rated(400, rng)
        rule = fit_interval([x[0] for x in cal], [spread(x[1]) for x in cal], [x[2] for x in cal], coverage,
                            interval_floor(c))
        spans = [interval(c, rule, s, p) for s, p, _ in new]
        covered.append(sum(lo <= m <= hi for (lo, hi), (_, _, m) in zip(spans, new)) / len(new))
        width.append(sum(hi - lo for lo, hi in spans) / len(spans))
        plain = fit_interval([x[0] for x in cal], [0.0] * n, [x[2] for x in cal], coverage, 1.0)
        plain_width.append(sum(min(5, s + plain["interval_q"]) - max(1, s - plain["interval_q"]) for s, _, _ in new)
                           / len(new))
    mean = sum(covered) / len(covered)
    slack = 3 * math.sqrt(coverage * (1 - coverage) / (300 * 400)) + 3 * math.sqrt(coverage * (1 - coverage) / n / 300)
    assert coverage - slack <= mean <= coverage + 1 / (n + 1) + slack, (mean, slack)
    assert sum(width) < 0.95 * sum(plain_width), (sum(width) / 300, sum(plain_width) / 300)


def test_too_few_items_for_an_interval_give_the_whole_scale_and_say_how_many_would_do() -> None:
    c = load_spec(TASKS / "emobank.yaml").criteria[0]
    cal = _rated(8, random.Random(4))
    rule = fit_rule([0.5] * 8, [False] * 8, 0.1, 0.1, 0.5) | fit_interval(
        [x[0] for x in cal], [spread(x[1]) for x in cal], [x[2] for x in cal], 0.9, interval_floor(c))
    assert rule["interval_q"] is None and rule["interval_items_needed"] == 9
    assert interval(c, rule, 3.2, cal[0][1]) == (1.0, 5.0)
    assert "at least 9" in describe("Valence", rule)
    nine = _rated(9, random.Random(4))
    rule = fit_interval([x[0] for x in nine], [spread(x[1]) for x in nine], [x[2] for x in nine], 0.9,
                        interval_floor(c))
    lo, hi = interval(c, rule, 3.0, nine[0][1])
    assert rule["interval_q"] is not None and 1.0 <= lo < 3.0 < hi <= 5.0
    with pytest.raises(ValueError):
        fit_interval([1.0], [0.1], [1.0], 1.0, 0.25)


def test_an_interval_travels_in_the_spec_and_a_bad_one_is_refused() -> None:
    from dataclasses import replace

    spec = load_spec(TASKS / "emobank.yaml")
    c = spec.criteria[0]
    cal = _rated(100, random.Random(6))
    rule = fit_rule([0.5] * 100, [False] * 100, 0.1, 0.1, 0.5) | fit_interval(
        [x[0] for x in cal], [spread(x[1]) for x in cal], [x[2] for x in cal], 0.9, interval_floor(c))
    with_rule = replace(spec, criteria=(replace(c, trust=rule), *spec.criteria[1:]))
    assert spec_from_json(with_rule.to_json()) == with_rule
    unbounded = replace(spec, criteria=(replace(c, trust=rule | {"interval_q": None}), *spec.criteria[1:]))
    assert spec_from_json(unbounded.to_json()).criteria[0].trust["interval_q"] is None
    raw = json.loads(with_rule.to_json())
    for bad in ({k: v for k, v in rule.items() if k != "interval_floor"}, {**rule, "coverage": 1.5},
                {**rule, "interval_q": -1}, {**rule, "interval_method": 3}):
        raw["criteria"][0]["trust"] = bad
        with pytest.raises(SpecError):
            spec_from_json(json.dumps(raw))
    labels = json.loads(load_spec(TASKS / "goemotions.yaml").to_json())
    labels["criteria"][0]["trust"] = rule
    with pytest.raises(SpecError, match="rating scales"):
        spec_from_json(json.dumps(labels))


LABELS = load_spec(TASKS / "goemotions.yaml")


def _labelled(n: int, rng: np.random.Generator, sharpen: float) -> list[tuple[dict[str, float], list[str]]]:
    """N synthetic items of GoEmotions' 28 labels: (the annotator's probabilities, as a record writes
    them, and three raters' labels). Each item's classes have a random belief; the annotator's
    probabilities are that belief raised to SHARPEN and renormalised (1: calibrated; 2: over-sure,
    as fine-tunes are), the raters draw from the belief itself."""
    names = [str(v) for v in LABELS.criteria[0].values]
    belief = rng.random((n, len(names))) ** 4
    belief /= belief.sum(1, keepdims=True)
    sharp = belief ** sharpen
    sharp = np.round(sharp / sharp.sum(1, keepdims=True), 6)
    drawn = (np.cumsum(belief, 1)[:, None, :] < rng.random((n, 3, 1))).sum(-1).clip(0, len(names) - 1)
    return [(dict(zip(names, row.tolist())), [names[k] for k in ks]) for row, ks in zip(sharp, drawn)]


@pytest.mark.parametrize("coverage,n,sharpen", [(0.9, 200, 1.0), (0.8, 60, 2.0), (0.95, 500, 0.5)])
def test_label_sets_hold_a_majority_label_as_often_as_they_promise(coverage: float, n: int, sharpen: float) -> None:
    """Split conformal label sets: over 200 draws of N held-out items, the share of new items whose
    set holds a label the raters chose most often averages at least COVERAGE and at most
    COVERAGE + 1 / (N + 1) (Monte Carlo slack aside), whether the annotator's probabilities are
    calibrated, over-sure or under-sure. The set follows the annotator's doubt: one label on some
    items, several on others, far fewer than all 28 on average."""
    c = LABELS.criteria[0]
    rng = np.random.default_rng(42)
    draws, m = 200, 300
    covered, sizes, singles = [], [], 0
    for _ in range(draws):
        cal, new = _labelled(n, rng, sharpen), _labelled(m, rng, sharpen)
        rule = fit_set([majority_prob(r, p) for p, r in cal], coverage)
        hit = 0
        for probs, raters in new:
            label = max(probs, key=lambda k: probs[k])
            members = label_set(c, rule, label, probs)
            assert probs[str(members[0])] == probs[label]
            counts = {k: raters.count(k) for k in raters}
            hit += any(counts.get(str(x), 0) == max(counts.values()) for x in members)
            sizes.append(len(members))
            singles += len(members) == 1
        covered.append(hit / m)
    mean = sum(covered) / len(covered)
    var = coverage * (1 - coverage)
    slack = 3 * math.sqrt(var / (draws * m)) + 3 * math.sqrt(var / n / draws)
    assert coverage - slack <= mean <= coverage + 1 / (n + 1) + slack, (mean, slack)
    assert singles > 0 and max(sizes) > 1 and sum(sizes) / len(sizes) < 14, (singles, sum(sizes) / len(sizes))


def test_too_few_items_for_a_label_set_give_every_label_and_the_rule_is_byte_identical() -> None:
    c = LABELS.criteria[0]
    cal = _labelled(8, np.random.default_rng(4), 1.0)
    rule = fit_rule([0.5] * 8, [False] * 8, 0.1, 0.1, 0.0) | fit_set([majority_prob(r, p) for p, r in cal], 0.9)
    assert rule["set_q"] is None and rule["set_items_needed"] == 9
    assert set(label_set(c, rule, "joy", cal[0][0])) == set(c.values)
    assert "at least 9" in describe("emotion", rule)
    nine = [majority_prob(r, p) for p, r in _labelled(9, np.random.default_rng(4), 1.0)]
    rule = fit_set(nine, 0.9)
    assert rule["set_q"] is not None and json.dumps(rule) == json.dumps(fit_set(nine[::-1], 0.9))
    probs = {str(v): 0.0 for v in c.values} | {"joy": 0.7, "love": 0.3}
    assert label_set(c, {"set_q": 0.0}, "joy", probs) == ("joy",)  # the written label, always
    assert label_set(c, {"set_q": 0.7}, "joy", probs) == ("joy", "love")  # most probable first
    assert "label sets: every label of probability >= 0.3" in describe("emotion", fit_rule([0.5] * 8, [False] * 8,
                                                                                            0.1, 0.1, 0.0)
                                                                      | {**rule, "set_q": 0.7})
    with pytest.raises(ValueError):
        fit_set([0.5], 1.0)


def test_a_label_set_travels_in_the_spec_and_to_the_records_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    from edge_annotator.runtime.annotator import criterion_score
    from edge_annotator.runtime.data import InputError
    from edge_annotator.runtime.records import read_predictions, result_record

    c = LABELS.criteria[0]
    cal = _labelled(100, np.random.default_rng(6), 1.0)
    rule = fit_rule([0.5] * 100, [False] * 100, 0.1, 0.1, 0.0) | fit_set([majority_prob(r, p) for p, r in cal], 0.9)
    spec = replace(LABELS, criteria=(replace(c, trust=rule),))
    assert spec_from_json(spec.to_json()) == spec
    raw = json.loads(spec.to_json())
    for bad in ({k: v for k, v in rule.items() if k != "set_q"}, {**rule, "set_q": 1.5}, {**rule, "set_method": 3},
                {**rule, "interval_q": 0.3}):
        raw["criteria"][0]["trust"] = bad
        with pytest.raises(SpecError):
            spec_from_json(json.dumps(raw))
    scale = json.loads(load_spec(TASKS / "emobank.yaml").to_json())
    scale["criteria"][0]["trust"] = fit_rule([0.5] * 100, [False] * 100, 0.1, 0.1, 0.5) | fit_set([0.5] * 100, 0.9)
    with pytest.raises(SpecError, match="label sets are for labels"):
        spec_from_json(json.dumps(scale))
    # annotate's Score carries the set, the record writes it, and read_predictions reads it back
    probs = [0.0] * len(c.scale)
    probs[[str(v) for v in c.values].index("joy")], probs[[str(v) for v in c.values].index("love")] = 0.55, 0.45
    sc = criterion_score(spec.criteria[0], probs, 6)
    assert sc.label == "joy" and sc.label_set is not None and sc.label_set[0] == "joy"
    rec = result_record("a", {c.name: sc}, {"model_sha256": "0" * 64, "spec_sha256": spec.sha256})
    f = tmp_path / "pred.jsonl"
    f.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "id": "b", "sets": {c.name: ["joy", "nope"]}}) + "\n")
    with pytest.raises(InputError, match="sets") as e:
        read_predictions(f, spec)
    assert e.value.line == 2
    f.write_text(json.dumps(rec) + "\n")
    assert read_predictions(f, spec)[0].sets == {c.name: sc.label_set}


@pytest.mark.slow
def test_trust_writes_the_rule_and_annotate_select_and_the_rule_agree(annotator_gguf: Path, tmp_path: Path) -> None:
    """On the held-out items themselves, annotate with the written annotator accepts exactly the
    items the rule counted (the confidence is read from the record's own values), changes nothing
    else of the record, and select --unaccepted picks exactly the others. The raters here are made
    to agree with the zero-shot model on all but every fifth item (the rule's promise itself is
    tested on items with known error rates above): what is tested is the path."""
    items = DATA / "emobank-test-50.jsonl"
    pred = tmp_path / "pred.jsonl"
    runner = CliRunner()
    r = runner.invoke(cli, ["annotate", str(annotator_gguf), str(items), "--threads", "2", "-o", str(pred)])
    assert r.exit_code == 0, r.output
    human = tmp_path / "human.jsonl"
    with human.open("w") as f:
        recs = [json.loads(x) for x in pred.read_text().splitlines()]
        for k, (line, rec) in enumerate(zip(items.read_text().splitlines(), recs, strict=True)):
            near = {c: min(5, max(1, round(v))) for c, v in rec["scores"].items()}
            far = {c: 1 if v >= 3 else 5 for c, v in rec["scores"].items()}
            f.write(json.dumps({**json.loads(line), "ratings": [{"labels": far if k % 5 == 0 else near}]}) + "\n")
    out = tmp_path / "trusted.gguf"
    r = runner.invoke(cli, ["trust", str(annotator_gguf), str(pred), str(human), "--target", "0.4", "--delta", "0.2",
                            "--json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rules = json.loads(r.stdout)
    assert set(rules) == {"Valence", "Arousal", "Dominance"}
    assert any(x["threshold"] is not None and x["accepted"] > 0 for x in rules.values()), rules
    again = tmp_path / "again.jsonl"
    r = runner.invoke(cli, ["annotate", str(out), str(items), "--threads", "2", "-o", str(again)])
    assert r.exit_code == 0, r.output
    before = [json.loads(x) for x in pred.read_text().splitlines()]
    after = [json.loads(x) for x in again.read_text().splitlines()]
    for a, b in zip(before, after, strict=True):
        assert {k: v for k, v in b.items() if k not in ("accept", "intervals", "model_sha256", "spec_sha256")} == \
               {k: v for k, v in a.items() if k not in ("model_sha256", "spec_sha256")}
        assert set(b["accept"]) == set(b["intervals"]) == set(rules)
    means = {}
    for line in human.read_text().splitlines():
        d = json.loads(line)
        means[d["id"]] = {c: sum(r["labels"][c] for r in d["ratings"]) / len(d["ratings"]) for c in rules}
    for name, rule in rules.items():
        assert sum(b["accept"][name] for b in after) == rule["accepted"], name
        # the held-out items' own intervals hold their raters' mean at least as often as the coverage
        inside = sum(b["intervals"][name][0] <= means[b["id"]][name] <= b["intervals"][name][1] for b in after)
        assert inside >= math.ceil((len(after) + 1) * rule["coverage"]), (name, inside)
        assert any(b["intervals"][name][1] - b["intervals"][name][0] < 4 for b in after), name
    # the same rule from the same files: byte-identical annotator
    out2 = tmp_path / "trusted2.gguf"
    r = runner.invoke(cli, ["trust", str(annotator_gguf), str(pred), str(human), "--target", "0.4", "--delta", "0.2",
                            "-o", str(out2)])
    assert r.exit_code == 0 and out2.read_bytes() == out.read_bytes(), r.output
    # the rest goes to the experts
    picks = tmp_path / "review.jsonl"
    r = runner.invoke(cli, ["select", str(again), "--model", str(out), "--unaccepted", "-n", "1000", "-o", str(picks)])
    assert r.exit_code == 0, r.output
    unaccepted = {b["id"] for b in after if not all(b["accept"].values())}
    assert {json.loads(x)["id"] for x in picks.read_text().splitlines()} == unaccepted
    # the CSV says which labels were accepted
    csv_out = tmp_path / "again.csv"
    r = runner.invoke(cli, ["convert", str(again), "--to", "csv", "--model", str(out), "-o", str(csv_out)])
    assert r.exit_code == 0, r.output
    header, *rows = csv_out.read_text().splitlines()
    col = header.split(",").index("Valence_accept")
    assert [row.split(",")[col] for row in rows] == [str(b["accept"]["Valence"]).lower() for b in after]
    low, high = header.split(",").index("Valence_low"), header.split(",").index("Valence_high")
    assert [[float(row.split(",")[low]), float(row.split(",")[high])] for row in rows] == \
           [b["intervals"]["Valence"] for b in after]
    # agree --report: what the stored rule accepted on these same items, beside the bound it promised
    r = runner.invoke(cli, ["agree", str(again), str(human), "--model", str(out), "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    for c in rep["criteria"]:
        stored, rule = c["trust"]["stored"], rules[c["criterion"]]
        assert (stored["items"], stored["bound"]) == (rule["items"], rule["bound"])
        assert stored["share"] == round(rule["accepted"] / rule["items"], 6)
        assert stored["disagree"] == (round(rule["disagree"] / rule["accepted"], 6) if rule["accepted"] else None)
    # Label Studio: the tasks convert makes and serve's /predict for the project made from them carry
    # the same marks (the prediction's score is the share accepted, the review control says which)
    tasks, config = tmp_path / "tasks.json", tmp_path / "config.xml"
    r = runner.invoke(cli, ["convert", str(again), "--to", "label-studio", "--model", str(out), "--items", str(items),
                            "-o", str(tasks), "--label-config", str(config)])
    assert r.exit_code == 0, r.output
    made = json.loads(tasks.read_text())
    for t, b in zip(made, after, strict=True):
        ls = t["predictions"][0]
        assert ls["score"] == sum(b["accept"].values()) / 3
        todo = [c for c in ("Valence", "Arousal", "Dominance") if not b["accept"][c]]
        assert ls["result"][-1]["value"]["text"] == [f"to review: {', '.join(todo)}" if todo
                                                       else "accepted: every label"]
    with server(out, spec=None) as (base, _):
        code, body, _ = _call(base, "POST", "/predict", {"tasks": [{"id": k, "data": t["data"]}
                                                                   for k, t in enumerate(made[:12])],
                                                         "label_config": config.read_text()})
        plain_code, plain, _ = _call(base, "POST", "/predict", {"tasks": [{"data": made[0]["data"]}]})
    assert code == 200 and body["results"] == [t["predictions"][0] for t in made[:12]]
    assert plain_code == 200 and plain["results"][0]["result"] == made[0]["predictions"][0]["result"][:-1]
    # predictions from another model are refused, naming the line
    r = runner.invoke(cli, ["trust", str(out), str(pred), str(human), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and f"{pred}:1:" in r.output and "not trusted.gguf" in r.output, r.output
    r = runner.invoke(cli, ["select", str(pred), "--model", str(annotator_gguf), "--unaccepted", "-n", "5"])
    assert r.exit_code == 1 and "no 'accept' marks" in r.output, r.output


@pytest.mark.slow
def test_trust_on_a_label_set_gives_each_record_its_label_set(gemma_path: Path, tmp_path: Path) -> None:
    """GoEmotions through trust and annotate: the written annotator's records carry, beside
    "accept", a label set per item, most probable first (the written label's probability first);
    on the held-out items themselves the sets hold the raters' label at least as often as the
    coverage promises; convert's CSV has the set; the same files give the same file, byte for byte."""
    from edge_annotator.export.metadata import embed_spec

    model = embed_spec(gemma_path, tmp_path / "goemotions.gguf", LABELS, {"base_model": "gemma-3-270m", "test": True})
    items = DATA / "goemotions-test-50.jsonl"
    pred, again, out = tmp_path / "pred.jsonl", tmp_path / "again.jsonl", tmp_path / "trusted.gguf"
    runner = CliRunner()
    r = runner.invoke(cli, ["annotate", str(model), str(items), "--threads", "2", "-o", str(pred)])
    assert r.exit_code == 0, r.output
    args = ["trust", str(model), str(pred), str(items), "--target", "0.2", "--coverage", "0.9", "--json"]
    r = runner.invoke(cli, [*args, "-o", str(out)])
    assert r.exit_code == 0, r.output
    rule = json.loads(r.stdout)["emotion"]
    assert rule["set_q"] is not None and "label sets" in r.output
    r = runner.invoke(cli, ["annotate", str(out), str(items), "--threads", "2", "-o", str(again)])
    assert r.exit_code == 0, r.output
    human = {json.loads(x)["id"]: json.loads(x)["labels"]["emotion"] for x in items.read_text().splitlines()}
    after = [json.loads(x) for x in again.read_text().splitlines()]
    assert len(after) == 50 and all(set(b["sets"]) == {"emotion"} for b in after)
    for b in after:
        members, probs = b["sets"]["emotion"], b["probs"]["emotion"]
        assert b["labels"]["emotion"] in members and probs[members[0]] == max(probs.values())
        assert [probs[m] for m in members] == sorted((probs[m] for m in members), reverse=True)
    inside = sum(human[b["id"]] in b["sets"]["emotion"] for b in after)
    assert inside >= math.ceil(51 * 0.9), inside
    assert any(len(b["sets"]["emotion"]) < 28 for b in after)
    csv_out = tmp_path / "again.csv"
    r = runner.invoke(cli, ["convert", str(again), "--to", "csv", "--model", str(out), "-o", str(csv_out)])
    assert r.exit_code == 0, r.output
    import csv

    rows = list(csv.DictReader(csv_out.open()))
    assert [row["emotion_set"] for row in rows] == ["|".join(b["sets"]["emotion"]) for b in after]
    r = runner.invoke(cli, [*args, "-o", str(tmp_path / "trusted2.gguf")])
    assert r.exit_code == 0 and (tmp_path / "trusted2.gguf").read_bytes() == out.read_bytes(), r.output
