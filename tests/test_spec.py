from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TASKS

from edge_annotator.runtime.spec import SpecError, load_spec, parse_spec, spec_from_json

SHIPPED = sorted(TASKS.glob("*.yaml"))


def test_every_shipped_spec_is_present() -> None:
    assert {p.stem for p in SHIPPED} >= {"goemotions", "emobank", "convabuse", "qa-rubric"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_loads_and_round_trips(path: Path) -> None:
    spec = load_spec(path)
    assert len(spec.templates) >= 2, "training needs paraphrased templates"
    again = spec_from_json(spec.to_json())
    assert again == spec
    assert again.sha256 == spec.sha256


def test_shipped_spec_contents() -> None:
    go = load_spec(TASKS / "goemotions.yaml")
    assert go.kind == "labels" and len(go.criteria) == 1 and len(go.criteria[0].scale) == 28
    emo = load_spec(TASKS / "emobank.yaml")
    assert [c.name for c in emo.criteria] == ["Valence", "Arousal", "Dominance"]
    assert all(c.values == [1, 2, 3, 4, 5] for c in emo.criteria)
    ca = load_spec(TASKS / "convabuse.yaml")
    assert ca.input_names == ["prev_agent", "prev_user", "agent", "user"]
    assert ca.criteria[0].level == "ordinal" and ca.criteria[0].values == [-3, -2, -1, 0, 1]
    qa = load_spec(TASKS / "qa-rubric.yaml")
    assert [c.name for c in qa.criteria] == ["Completeness", "Clarity", "Interpretability", "Conciseness",
                                             "Accuracy", "Relevance"]
    assert qa.input_names == ["context", "question", "answer"]
    assert all(c.values == [-2, -1, 0, 1, 2] for c in qa.criteria)


GOOD = {
    "name": "t",
    "inputs": [{"name": "text"}],
    "criteria": [{"name": "c", "description": "d", "level": "ordinal",
                  "scale": [{"value": 1, "anchor": "low"}, {"value": 2, "anchor": "high"}]}],
    "templates": ["Rate it.\n{rubric}"],
}


def _with(**kw):
    return {**GOOD, **kw}


@pytest.mark.parametrize("raw, needle", [
    (_with(name=""), "'name' must be"),                                          # empty name
    (_with(inputs=[]), "'inputs' must be"),                                      # no input field
    (_with(inputs=[{"name": "id"}]), "'id' is reserved"),                        # id is not an input
    (_with(inputs=[{"name": "a"}, {"name": "a"}]), "appears more than once"),    # duplicate field
    (_with(templates=[]), "'templates' must be"),                                # no template
    (_with(templates=["{nope}"]), "unknown placeholder"),                         # bad placeholder
    (_with(templates=["a", "a"]), "must differ"),                                 # duplicate paraphrase
    (_with(answer_cue="{bad}:"), "answer_cue"),                                   # bad cue placeholder
    (_with(bogus=1), "unknown key 'bogus'"),                                      # typo'd key
    ({**{k: v for k, v in GOOD.items() if k != "criteria"}}, "exactly one of"),  # neither criteria nor labels
    (_with(labels={"classes": ["a", "b"]}), "exactly one of"),                   # both
    (_with(criteria=[{"name": "c", "level": "ratio", "scale": [{"value": 1, "anchor": "a"},
                                                               {"value": 2, "anchor": "b"}]}]), "'level' must be"),
    (_with(criteria=[{"name": "c", "level": "interval", "scale": [{"value": 1, "anchor": "a"}]}]), "at least two"),
    (_with(criteria=[{"name": "c", "level": "interval", "scale": [{"value": 2, "anchor": "a"},
                                                                  {"value": 1, "anchor": "b"}]}]), "increasing"),
    (_with(criteria=[{"name": "c", "level": "interval", "scale": [{"value": 1.5, "anchor": "a"},
                                                                  {"value": 2, "anchor": "b"}]}]), "integer"),
    (_with(criteria=[{"name": "c", "level": "interval", "scale": [{"value": 1}, {"value": 2, "anchor": "b"}]}]),
     "anchor"),                                                                   # scales need anchors
    (_with(criteria=[{"name": "c", "level": "interval", "scale": [{"value": 1, "anchor": "a", "answer": "x"},
                                                                  {"value": 2, "anchor": "b", "answer": "x"}]}]),
     "answers must be distinct"),
    (_with(criteria=[{"name": "c", "level": "interval", "scale": [{"value": 1, "anchor": "a", "extra": "b"},
                                                                  {"value": 2, "anchor": "b"}]}]), "unknown key"),
])
def test_invalid_spec_is_rejected(raw: dict, needle: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(raw, "x.yaml")
    assert needle in str(e.value)
    assert str(e.value).startswith("x.yaml: invalid task spec")


def test_every_problem_is_reported_at_once() -> None:
    raw = _with(name="", inputs=[], templates=[], bogus=1)
    with pytest.raises(SpecError) as e:
        parse_spec(raw, "x.yaml")
    assert len(e.value.problems) == 4, e.value.problems


def test_labels_become_one_nominal_criterion() -> None:
    raw = {k: v for k, v in GOOD.items() if k != "criteria"}
    spec = parse_spec({**raw, "labels": {"name": "emotion", "classes": ["joy", {"value": "anger", "anchor": "mad"}]}})
    (c,) = spec.criteria
    assert (c.name, c.level, c.values) == ("emotion", "nominal", ["joy", "anger"])
    assert spec_from_json(spec.to_json()) == spec


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ninputs: [\n")
    with pytest.raises(SpecError, match=r"(?s)bad.yaml: .*line \d+, column"):
        load_spec(p)


def test_hash_changes_with_content() -> None:
    a = parse_spec(GOOD)
    b = parse_spec(_with(templates=["Rate it now.\n{rubric}"]))
    assert a.sha256 != b.sha256
