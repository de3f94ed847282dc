"""The llama.cpp runtime on the real Gemma 3 270M: determinism, prefix reuse, scoring."""

from __future__ import annotations

import pytest
from conftest import TASKS, TEXTS

from edge_annotator.runtime.annotator import Annotator, build_trie
from edge_annotator.runtime.engine import ContextOverflow, LlamaEngine
from edge_annotator.runtime.prompt import prompt_segments
from edge_annotator.runtime.spec import SpecError, load_spec, parse_spec

pytestmark = pytest.mark.slow

EMO = load_spec(TASKS / "emobank.yaml")


def test_cached_results_equal_the_one_item_at_a_time_reference(engine: LlamaEngine) -> None:
    ann = Annotator(engine, EMO)
    engine.reset()
    before = engine.n_evaluated
    in_order = ann.score_many([{"text": t} for t in TEXTS])
    instr, plan = ann.plan({"text": TEXTS[0]})
    # the instruction is evaluated once for the job, not once per item or criterion
    assert engine.n_evaluated - before < len(instr) + len(TEXTS) * 60
    assert plan.shared == len(instr) and len(plan.cues) == 3
    for k in reversed(range(len(TEXTS))):  # the unoptimised path: empty cache, one item, other order
        engine.reset()
        assert ann.score({"text": TEXTS[k]}) == in_order[k]


def test_batching_items_is_opt_in_and_close(engine: LlamaEngine) -> None:
    ref = Annotator(engine, EMO).score_many([{"text": t} for t in TEXTS])
    got = Annotator(engine, EMO, batch=4).score_many([{"text": t} for t in TEXTS])
    for r, g in zip(ref, got):
        for c in r:
            assert max(abs(r[c].probs[v] - g[c].probs[v]) for v in r[c].probs) < 0.15


def test_segments_make_logits_independent_of_history(engine: LlamaEngine) -> None:
    ann = Annotator(engine, EMO)
    item = {"text": "I can't believe it worked."}
    instr, item_text, _ = prompt_segments(EMO, item, EMO.criteria[0])
    engine.reset()
    fresh = ann.score(item)
    engine.reset()
    engine.set_prefix(engine.tokenize(instr + item_text)[:-2])  # an unrelated, partly shared sequence first
    assert ann.score(item) == fresh
    assert ann.score(item) == fresh  # the instruction cached: only the item's tree is decoded


def test_thread_count_does_not_change_scores(gemma_path) -> None:
    out = []
    for n in (1, 2, 4):
        with LlamaEngine(gemma_path, n_threads=n) as eng:
            out.append(Annotator(eng, EMO).score_many([{"text": t} for t in TEXTS]))
    assert out[0] == out[1] == out[2]


@pytest.mark.parametrize("name", ["emobank", "goemotions", "convabuse", "qa-rubric"])
def test_shipped_specs_answer_in_one_evaluation(engine: LlamaEngine, name: str) -> None:
    spec = load_spec(TASKS / f"{name}.yaml")
    ann = Annotator(engine, spec)
    for c in spec.criteria:
        assert ann.tries[c.name].evaluations == 1, c.name  # distinct first tokens: one decode per criterion


def test_scores_are_distributions_over_the_allowed_labels(engine: LlamaEngine) -> None:
    ann = Annotator(engine, EMO)
    scores = ann.score({"text": "My dog died this morning."})
    for c in EMO.criteria:
        s = scores[c.name]
        assert list(s.probs) == c.values
        assert sum(s.probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert s.label == max(s.probs, key=lambda v: s.probs[v])


def test_multi_token_answers_use_the_trie(engine: LlamaEngine) -> None:
    raw = {"name": "t", "inputs": ["text"], "templates": ["Rate.\n{rubric}"],
           "criteria": [{"name": "q", "level": "ordinal", "scale": [
               {"value": 1, "anchor": "a", "answer": "very bad"}, {"value": 2, "anchor": "b", "answer": "very good"},
               {"value": 3, "anchor": "c", "answer": "fine"}]}]}
    spec = parse_spec(raw)
    trie = build_trie(engine.tokenize, spec, spec.criteria[0])
    assert trie.evaluations == 2  # ' very' | ' fine', then ' bad' | ' good'
    s = Annotator(engine, spec).score({"text": "ok"})["q"]
    assert sum(s.probs.values()) == pytest.approx(1.0, abs=1e-5)


def test_answers_that_are_not_distinct_tokens_are_rejected(engine: LlamaEngine) -> None:
    raw = {"name": "t", "inputs": ["text"], "templates": ["Rate.\n{rubric}"],
           "criteria": [{"name": "q", "level": "ordinal", "scale": [
               {"value": 1, "anchor": "a"}, {"value": 12, "anchor": "b"}]}]}
    with pytest.raises(SpecError, match="do not tokenize to distinct tokens"):
        Annotator(engine, parse_spec(raw))


def test_context_overflow_is_reported(gemma_path) -> None:
    with LlamaEngine(gemma_path, n_ctx=256, n_threads=2) as eng:
        toks = eng.tokenize("word " * 300)
        with pytest.raises(ContextOverflow, match=f"needs {len(toks)} tokens but the context window is 256"):
            eng.set_prefix(toks)
