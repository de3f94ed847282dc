"""The head route: a linear head per criterion on the model's own hidden states (export/heads.py,
runtime/linear_head.py). Fitting recovers what synthetic states carry and is deterministic; a
spec holds a head checked whole; on the real model, `annotate-cli head` writes an annotator whose
records are the head applied to llama.cpp's states, byte-identical across threads, workers and
--resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DATA, TASKS

from edge_annotator.export.heads import (
    _folds,
    _targets,
    candidate_taps,
    context_groups,
    cross_validate,
    fit_criterion,
    fit_heads,
    ranked,
    with_heads,
)
from edge_annotator.runtime.data import Item
from edge_annotator.runtime.errors import SpecError
from edge_annotator.runtime.linear_head import MAX_MEMBERS, Head, LinearHead, Tap, pack
from edge_annotator.runtime.spec import load_spec, spec_from_json

SPEC = load_spec(TASKS / "emobank.yaml")
LABELS_SPEC = load_spec(TASKS / "goemotions.yaml")


def _synthetic(n: int = 300, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """States whose first direction carries a 1..5 rating (three raters around it), and noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * 3.0 + 1.5
    truth = 3.0 + 1.2 * np.tanh(x[:, 0] / 3.0) + 0.5 * np.tanh(x[:, 1] / 3.0)
    return x, truth


def test_fitting_recovers_a_rating_from_the_states_and_is_deterministic() -> None:
    x, truth = _synthetic()
    rng = np.random.default_rng(1)
    ratings = [[int(np.clip(round(t + rng.normal(0, 0.4)), 1, 5)) for _ in range(3)] for t in truth]
    ids = [f"s{i}" for i in range(len(x))]
    c = SPEC.criteria[0]
    noise = np.random.default_rng(3).normal(size=x.shape)  # a tap that carries nothing, beside one that does
    states = {Tap("mean", 4): x, Tap("cue", -1): noise}
    a = fit_criterion(c, states, ratings, ids, seed=0)
    b = fit_criterion(c, states, ratings, ids, seed=0)
    assert a.head is not None and a.head.to_dict() == b.head.to_dict() and a.cv == b.cv
    assert a.head.info and a.head.info["cv_alpha"] > 0.8, a.cv  # the raters themselves are at about 0.85
    assert a.head.taps == (Tap("mean", 4),)  # cross-validation finds the tap that carries the rating
    best = max(a.cv.values(), key=lambda v: -1 if v is None else v)
    assert a.cv[a.chosen[0].name] == best and a.head.info["cv_alpha"] >= best  # selection starts at the best
    assert len(a.head.members) == len(a.chosen) <= 10 and sum(a.head.weights or [len(a.chosen)]) == 10
    one = fit_criterion(c, states, ratings, ids, seed=0, members=1)  # the single best
    assert one.chosen == a.chosen[:1] and len(one.head.members) == 1 and one.head.info["penalty"] == a.chosen[0].penalty
    assert one.head.info["cv_alpha"] == best
    # why forward selection and not the plain mean of the ten best: here that mean would average the
    # tap with its over-penalized neighbours
    oof = cross_validate(c, states, ratings, ids)
    assert oof.alpha(c, ranked(oof)[:10], ratings) < best - 0.05 <= a.head.info["cv_alpha"] - 0.05
    # shuffled ratings carry nothing: cross-validation says so
    shuffled = [ratings[i] for i in np.random.default_rng(2).permutation(len(ratings))]
    nothing = fit_criterion(c, {Tap("mean", 4): x}, shuffled, ids, seed=0)
    assert nothing.head is not None and (nothing.head.info or {})["cv_alpha"] < 0.2, nothing.cv
    # the head predicts as it was scored: the mean of ratings, on the scale
    probs, score = a.head.apply([1, 2, 3, 4, 5], lambda t: x[0])
    assert abs(sum(probs) - 1) < 1e-9 and score is not None and 1 <= score <= 5


def test_an_ensemble_is_the_mean_of_its_members() -> None:
    rng = np.random.default_rng(0)
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    members = (LinearHead("ridge", Tap("cue", -1), 6, rng.normal(size=6).astype(np.float32),
                          np.array([3.0], np.float32), sigma=0.7),
               LinearHead("softmax", Tap("mean", 2), 6, rng.normal(size=(5, 6)).astype(np.float32),
                          rng.normal(size=5).astype(np.float32)),
               LinearHead("ridge", Tap("last", 2), 6, rng.normal(size=6).astype(np.float32) * 9,
                          np.array([0.0], np.float32)))  # far off the scale: clipped to it
    states = {t: rng.normal(size=6) for t in (Tap("cue", -1), Tap("mean", 2), Tap("last", 2))}
    head = Head(members, {"cv_alpha": 0.5}, (5.0, 3.0, 2.0))
    probs, score = head.apply(values, states.__getitem__)
    each = [m.apply(values, states[m.tap]) for m in members]
    w = np.array([0.5, 0.3, 0.2])
    assert np.allclose(probs, w @ np.array([p for p, _ in each])) and abs(sum(probs) - 1) < 1e-12
    scores = [s if s is not None else float(np.dot(values, p)) for p, s in each]
    assert score == pytest.approx(float(w @ scores)) and 1 <= score <= 5
    assert head.taps == (Tap("cue", -1), Tap("last", 2), Tap("mean", 2))
    assert head.describe() == "the weighted mean of 3 heads (ridge 2, softmax 1) at 3 taps"
    back = Head.from_dict(head.to_dict(), 5)
    assert back.to_dict() == head.to_dict() and back.apply(values, states.__getitem__) == (probs, score)
    assert head.to_dict()["weights"] == [5, 3, 2]
    equal = Head(members)
    assert equal.apply(values, states.__getitem__)[1] == pytest.approx(np.mean(scores))
    assert "weights" not in equal.to_dict() and equal.describe().startswith("the mean of 3 heads")
    assert Head.from_dict(members[0].to_dict(), 5).to_dict() == members[0].to_dict()  # one head: its own form
    labels = Head(members[1:2] * 2)  # a label set: the mean probabilities, no score
    assert labels.apply([], states.__getitem__)[1] is None


def test_a_label_set_gets_a_softmax_head_that_finds_the_classes() -> None:
    c = LABELS_SPEC.criteria[0]
    k = 4
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(k, 32)) * 4
    cls = rng.integers(0, k, 400)
    x = centers[cls] + rng.normal(size=(400, 32))
    ratings = [[c.values[int(y)]] for y in cls]
    fit = fit_criterion(c, {Tap("last", 2): x}, ratings, [str(i) for i in range(400)])
    assert fit.chosen and all(cd.kind == "softmax" for cd in fit.chosen)
    assert fit.head is not None and (fit.head.info or {})["cv_alpha"] > 0.9, fit.cv
    assert not any(" ridge " in k for k in fit.cv)


def test_targets_share_a_rating_between_two_levels() -> None:
    c = load_spec(TASKS / "emobank.yaml").criteria[0]  # interval 1..5
    mean, dist = _targets(c, [[3, 4], [3.25]])
    assert mean.tolist() == [3.5, 3.25]
    assert dist[0].tolist() == [0, 0, 0.5, 0.5, 0] and np.allclose(dist[1], [0, 0, 0.75, 0.25, 0])


def test_items_sharing_a_context_stay_in_one_fold() -> None:
    spec = load_spec(TASKS / "usr-personachat.yaml")
    items = [Item(f"r{i}", {f.name: f"dialogue {i // 5}" for f in spec.inputs[:-1]} | {spec.inputs[-1].name: str(i)},
                  "f", i) for i in range(100)]
    groups = context_groups(spec, items)
    assert len(set(groups)) == 20
    folds = _folds(groups, seed=0)
    assert all(len({folds[i] for i in range(k * 5, k * 5 + 5)}) == 1 for k in range(20))
    assert sorted(np.bincount(folds).tolist()) == [20] * 5
    assert context_groups(SPEC, items) == [it.id for it in items]  # one field: every item its own group
    assert candidate_taps(18) == [Tap("cue", -1)] + [Tap(a, n) for n in (5, 8, 11) for a in ("cue", "last", "mean")]


def test_a_spec_holds_a_head_checked_whole() -> None:
    c = SPEC.criteria[0]
    head = LinearHead("softmax", Tap("mean", 8), 8, np.ones((5, 8), np.float32), np.zeros(5, np.float32),
                      info={"items": 3})
    spec = replace(SPEC, criteria=(replace(c, head=head.to_dict()), *SPEC.criteria[1:]))
    back = spec_from_json(spec.to_json())
    assert back == spec and back.sha256 == spec.sha256 != SPEC.sha256
    assert "head" not in json.loads(SPEC.to_json())["criteria"][0]  # specs without heads hash as before
    bad = {
        "kind": ({**head.to_dict(), "kind": "cubic"}, "'kind' must be one of"),
        "shape": ({**head.to_dict(), "dim": 9}, "45 belong"),
        "base64": ({**head.to_dict(), "w": "@@@"}, "not base64"),
        "nan": ({**head.to_dict(), "b": pack(np.array([np.nan] * 5))}, "not finite"),
        "sigma": ({**LinearHead("ridge", Tap("cue", -1), 8, np.ones(8), np.zeros(1)).to_dict(), "sigma": -1},
                  "'sigma'"),
        "tap": ({**head.to_dict(), "tap": "mean@-1"}, "read at the cue only"),
        "tap name": ({**head.to_dict(), "tap": "middle"}, "'tap' must be one of"),
        "members": ({"members": [head.to_dict()] * (MAX_MEMBERS + 1)}, f"a list of 1 to {MAX_MEMBERS} heads"),
        "no members": ({"members": []}, f"a list of 1 to {MAX_MEMBERS} heads"),
        "member": ({"members": [head.to_dict(), {**head.to_dict(), "w": "@@@"}]}, "member 2: 'w' or 'b': not base64"),
        "sizes": ({"members": [head.to_dict(), {**head.to_dict(), "dim": 9, "w": pack(np.ones(45))}]},
                  "states of different sizes"),
        "extra": ({"members": [head.to_dict()], "kind": "ridge"}, "'members', 'weights' and 'info' only"),
        "weights": ({"members": [head.to_dict()] * 2, "weights": [1, 0]}, "'weights' must be a list of 2 positive"),
        "weights n": ({"members": [head.to_dict()] * 2, "weights": [1]}, "'weights' must be a list of 2 positive"),
    }
    for name, (h, needle) in bad.items():
        d = json.loads(spec.to_json())
        d["criteria"][0]["head"] = h
        with pytest.raises(SpecError, match=needle):
            spec_from_json(json.dumps(d))
    k = len(LABELS_SPEC.criteria[0].scale)  # a label set's head survives its round trip through 'labels'
    soft = LinearHead("softmax", Tap("last", 3), 4, np.ones((k, 4), np.float32), np.zeros(k, np.float32)).to_dict()
    labelled = replace(LABELS_SPEC, criteria=(replace(LABELS_SPEC.criteria[0], head=soft),))
    assert spec_from_json(labelled.to_json()) == labelled
    m = replace(head, info=None).to_dict()  # a member's own info is not kept: the ensemble's is
    ensemble = {"members": [m, {**m, "tap": "cue@-1"}], "weights": [2, 1], "info": {"cv_alpha": 0.3}}
    both = replace(SPEC, criteria=(replace(c, head=ensemble), *SPEC.criteria[1:]))
    assert spec_from_json(both.to_json()) == both
    d = json.loads(LABELS_SPEC.to_json())
    ridge = LinearHead("ridge", Tap("cue", -1), 4, np.ones(4), np.zeros(1)).to_dict()
    d["criteria"][0]["head"] = {"members": [soft, ridge]}
    with pytest.raises(SpecError, match="rating scales only"):
        spec_from_json(json.dumps(d))
    d = json.loads(LABELS_SPEC.to_json())
    d["criteria"][0]["head"] = LinearHead("ridge", Tap("cue", -1), 8, np.ones(8), np.zeros(1)).to_dict()
    with pytest.raises(SpecError, match="rating scales only"):
        spec_from_json(json.dumps(d))


def test_with_heads_replaces_the_answer_tokens_and_their_calibration() -> None:
    x, truth = _synthetic(60, 16)
    items = [Item(f"s{i}", {"text": "x"}, "f", i, [{"Valence": int(round(t))}]) for i, t in enumerate(truth)]
    states = {Tap("cue", -1): np.stack([x, x, x], axis=1)}
    calibrated = replace(SPEC, criteria=tuple(replace(c, calibration=((1.0, 1.5), (5.0, 4.5)))
                                              for c in SPEC.criteria))
    fits = fit_heads(calibrated, items, states)
    spec = with_heads(calibrated, fits)
    got = {c.name: (c.head is not None, c.calibration) for c in spec.criteria}
    assert got == {"Valence": (True, ()), "Arousal": (False, ((1.0, 1.5), (5.0, 4.5))),
                   "Dominance": (False, ((1.0, 1.5), (5.0, 4.5)))}  # no rating of those: no head


# -- on the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head_gguf(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heads") / "emobank-head.gguf"
    r = CliRunner().invoke(_cli(), ["head", str(gemma_path), str(DATA / "emobank-train-64.jsonl"), "--spec",
                                    str(TASKS / "emobank.yaml"), "-o", str(out), "--threads", "2"])
    assert r.exit_code == 0, r.output
    return out


def _cli():  # type: ignore[no-untyped-def]
    from edge_annotator.runtime.cli import cli

    return cli


@pytest.mark.slow
def test_the_head_annotator_scores_with_the_head_on_llama_cpps_own_states(head_gguf: Path) -> None:
    from edge_annotator.runtime.annotator import Annotator
    from edge_annotator.runtime.engine import LlamaEngine
    from edge_annotator.runtime.gguf_meta import read_model_info

    spec = read_model_info(head_gguf).spec
    assert spec is not None and all(c.head for c in spec.criteria)
    heads = [Head.from_dict(c.head or {}, len(c.scale)) for c in spec.criteria]
    assert any(len(h.members) > 1 for h in heads), [h.describe() for h in heads]  # the default: a mean
    items = [json.loads(line) for line in (DATA / "emobank-test-50.jsonl").read_text().splitlines()[:6]]
    with LlamaEngine(head_gguf, n_threads=2) as eng:
        ann = Annotator(eng, spec)
        scored = ann.score_many([{"text": it["text"]} for it in items])
        states = ann.features([{"text": it["text"]} for it in items], sorted({t for h in heads for t in h.taps}))
    for sc, st in zip(scored, states):
        assert not isinstance(sc, Exception) and not isinstance(st, Exception)
        for ci, (c, head) in enumerate(zip(spec.criteria, heads)):
            probs, raw = head.apply([float(v) for v in c.values],
                                    lambda t: st[t][ci] if t.per_criterion else st[t])  # noqa: B023
            assert [round(p, 6) for p in probs] == list(sc[c.name].probs.values())
            want = raw if raw is not None else sum(float(v) * p for v, p in zip(c.values, probs))
            assert abs(sc[c.name].score - want) < 1e-9 and sc[c.name].label == c.values[int(np.argmax(probs))]


@pytest.mark.slow
def test_a_head_annotator_is_byte_identical_across_threads_workers_and_resume(head_gguf: Path,
                                                                              tmp_path: Path) -> None:
    cli = _cli()
    items = DATA / "emobank-test-50.jsonl"
    outs = {}
    for name, args in {"1 thread": ["--threads", "1"], "2 threads": ["--threads", "2"],
                       "2 workers": ["--workers", "2", "--threads", "2"]}.items():
        r = CliRunner().invoke(cli, ["annotate", str(head_gguf), str(items), *args])
        assert r.exit_code == 0, r.output
        outs[name] = r.stdout
    part = tmp_path / "part.jsonl"
    part.write_text("".join(outs["1 thread"].splitlines(keepends=True)[:20]))
    r = CliRunner().invoke(cli, ["annotate", str(head_gguf), str(items), "-o", str(part), "--resume", "--threads", "2"])
    assert r.exit_code == 0, r.output
    outs["resumed"] = part.read_text()
    assert len(set(outs.values())) == 1, {k: v[:200] for k, v in outs.items()}
    rec = json.loads(outs["1 thread"].splitlines()[0])
    assert set(rec) == {"id", "labels", "scores", "probs", "model_sha256", "spec_sha256"}
    assert all(abs(sum(p.values()) - 1) < 1e-5 for p in rec["probs"].values())


@pytest.mark.slow
def test_the_states_tapped_from_llama_cpp_are_the_hf_models_at_the_same_layer_and_token(gemma_path: Path,
                                                                                        gemma_hf: Path) -> None:
    """The residual stream llama.cpp gives after layer N at the item's last token is the HF model's
    hidden_states[N + 1] there (the HF folder is the same Q4_K_M weights in fp32): each within a few
    percent, and further from the layers beside it (measured: 2-8%). The final state at the cue is
    HF's last hidden state after its norm."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_annotator.runtime.annotator import Annotator
    from edge_annotator.runtime.engine import LlamaEngine
    from edge_annotator.runtime.prompt import prompt_segments

    fields = {"text": "The storm destroyed the village, and nobody came to help."}
    taps = [Tap("last", 4), Tap("last", 8), Tap("mean", 8), Tap("cue", -1)]
    with LlamaEngine(gemma_path, n_threads=2) as eng:
        ann = Annotator(eng, SPEC)
        got = ann.features([fields], taps)[0]
        stem = ann._stem(SPEC.criteria[0])  # the answers' common first token: the cue row follows it
        n_layer = eng.n_layer
    assert not isinstance(got, Exception)
    tok = AutoTokenizer.from_pretrained(gemma_hf)
    model = AutoModelForCausalLM.from_pretrained(gemma_hf, dtype=torch.float32).eval()
    instr, inputs, cue = prompt_segments(SPEC, fields, SPEC.criteria[0])
    a = tok(instr)["input_ids"]
    ab = tok(instr + inputs)["input_ids"]
    with torch.no_grad():
        hs = model.model(torch.tensor([ab]), output_hidden_states=True).hidden_states
        full = model.model(torch.tensor([tok(instr + inputs + cue)["input_ids"] + stem]), output_hidden_states=True)

    def rel(x: np.ndarray, y: torch.Tensor) -> float:
        yy = y.numpy()
        return float(np.linalg.norm(x - yy) / np.linalg.norm(yy))

    assert n_layer == len(hs) - 1 == 18
    for layer in (4, 8):
        here = rel(got[Tap("last", layer)], hs[layer + 1][0, -1])
        assert here < 0.08, (layer, here)
        assert rel(got[Tap("last", layer)], hs[layer][0, -1]) > 3 * here  # not the layer before
    assert rel(got[Tap("mean", 8)], hs[9][0, len(a):len(ab)].mean(0)) < 0.08
    assert rel(got[Tap("cue", -1)][0], full.last_hidden_state[0, -1]) < 0.12  # measured 0.079: after the norm
