from __future__ import annotations

from conftest import TASKS

from edge_annotator.runtime.prompt import RenderOptions, render_example, render_instruction, render_prompt
from edge_annotator.runtime.spec import load_spec

QA = load_spec(TASKS / "qa-rubric.yaml")
ITEM = {"context": "Paris is in France.", "question": "Where is Paris?", "answer": "In France."}


def test_canonical_prompt_layout() -> None:
    c = QA.criteria[0]
    p = render_prompt(QA, ITEM, c)
    instruction = render_instruction(QA)
    # shared instruction first, then the item's fields in spec order, then the cue: the order KV reuse needs
    assert p.startswith(instruction + "\n\n")
    assert p.endswith("\n\nCompleteness:")
    body = p[len(instruction):]
    assert body.index("Context:") < body.index("Question:") < body.index("Answer:")
    for crit in QA.criteria:
        assert crit.name in instruction
    assert "  bad = (-2)" in instruction


def test_prompts_of_one_item_differ_only_in_the_cue() -> None:
    a, b = (render_prompt(QA, ITEM, c) for c in QA.criteria[:2])
    head = a.rsplit("\n\n", 1)[0]
    assert b.startswith(head) and a != b


def test_options_change_the_text() -> None:
    c = QA.criteria[0]
    base = render_prompt(QA, ITEM, c)
    assert render_prompt(QA, ITEM, c, RenderOptions(template=1)) != base
    permuted = render_prompt(QA, ITEM, c, RenderOptions(input_order=(2, 0, 1)))
    body = permuted[len(render_instruction(QA)):]
    assert body.index("Answer:") < body.index("Context:") < body.index("Question:")
    shuffled = render_prompt(QA, ITEM, c, RenderOptions(level_orders={"Completeness": (4, 3, 2, 1, 0)}))
    assert shuffled.index("excellent = ") < shuffled.index("bad = ")


def test_render_example_appends_the_answer_string() -> None:
    c = QA.criteria[0]
    prompt, completion = render_example(QA, ITEM, c, 2)
    assert prompt == render_prompt(QA, ITEM, c) and completion == " excellent"
