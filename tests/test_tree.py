"""Token-tree micro-batches (hf/tree.py) give the loss and gradients of one sequence per prompt.

The tree packs a micro-batch's shared instruction once, each item once and each criterion's cue
as a branch, with a custom attention function; the reference runs every scoring row as its own
prompt through the model's own attention. They must agree within fp32 tolerance, on the real
Gemma 3 270M with a trained-looking adapter, for every shipped kind of spec: several criteria
(EmoBank), several input fields in a permuted order (ConvAbuse), 28 labels (GoEmotions), answers
that share a first token (a trie with a deeper branch), and a model with sliding-window layers
shorter than the prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA, TASKS

from edge_annotator.hf.tree import (
    Tokens,
    Unit,
    build_tree,
    level_logprobs,
    soft_cross_entropy,
    tree_attention,
    unshared_level_logprobs,
)
from edge_annotator.runtime.annotator import build_trie
from edge_annotator.runtime.prompt import CANONICAL, RenderOptions, render_prompt
from edge_annotator.runtime.spec import TaskSpec, load_spec, parse_spec
from edge_annotator.train.examples import load_items

pytestmark = pytest.mark.slow

# answers sharing their first token: the trie branches at the root and again below "very"
TWO_LEVEL = {
    "name": "deep", "inputs": [{"name": "text", "title": "Sentence"}],
    "criteria": [{"name": "Tone", "level": "ordinal", "scale": [
        {"value": 1, "answer": "very bad", "anchor": "hostile"}, {"value": 2, "answer": "bad", "anchor": "cold"},
        {"value": 3, "answer": "fine", "anchor": "neutral"}, {"value": 4, "answer": "very good", "anchor": "warm"}]},
        {"name": "Energy", "level": "interval", "scale": [
            {"value": 1, "answer": "low", "anchor": "calm"}, {"value": 2, "answer": "medium", "anchor": "lively"},
            {"value": 3, "answer": "high", "anchor": "frantic"}]}],
    "templates": ["Judge the sentence.\n\n{rubric}", "Read the sentence, then rate it.\n\n{rubric}"],
    "answer_cue": "{criterion}:",
}


# two fields, four 1-5 criteria: the shape of a dialogue-summary task
LONG = {
    "name": "summaries", "inputs": [{"name": "dialogue", "title": "Dialogue"}, {"name": "summary", "title": "Summary"}],
    "criteria": [{"name": n, "level": "ordinal", "scale": [
        {"value": v, "anchor": a} for v, a in zip(range(1, 6), ["poor", "weak", "fair", "good", "excellent"])]}
        for n in ("Coherence", "Consistency", "Fluency", "Relevance")],
    "templates": ["Rate the summary of the dialogue.\n\n{rubric}",
                  "Judge how well the summary renders the dialogue.\n\n{rubric}"],
    "answer_cue": "{criterion} ({min}-{max}):",
}


def _tok(gemma_hf: Path):
    from edge_annotator.train.model import load_tokenizer

    tok = load_tokenizer(gemma_hf)
    return tok, (lambda s: list(tok(s)["input_ids"]))


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         lora_dropout=0.0))
    torch.manual_seed(1)
    for n, p in m.named_parameters():
        if "lora_B" in n:  # as after training: B = 0 would make every gradient but B's vanish
            torch.nn.init.normal_(p, std=0.02)
    return m


def _units(spec: TaskSpec, fields: list[dict[str, str]], rng: np.random.Generator, permute: bool) -> list[Unit]:
    out = []
    for f in fields:
        t = [rng.dirichlet(np.ones(len(c.scale))) for c in spec.criteria]
        t[-1] = None if len(spec.criteria) > 1 and rng.random() < 0.3 else t[-1]  # an unrated criterion
        order = tuple(int(x) for x in rng.permutation(len(spec.inputs))) if permute else None
        out.append(Unit(f, t, input_order=order))
    return out


def _compare(model: torch.nn.Module, tok, spec: TaskSpec, units: list[Unit], opts: RenderOptions,
             dense: bool = False) -> None:
    T = lambda s: list(tok(s)["input_ids"])  # noqa: E731
    tries = {c.name: build_trie(T, spec, c) for c in spec.criteria}
    tree = build_tree(T, spec, tries, units, opts, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    with tree_attention(model, dense=dense):
        lp_tree = level_logprobs(model, tree)
    soft_cross_entropy(lp_tree, tree).backward()
    g_tree = [p.grad.clone() for p in params]
    model.zero_grad()
    lp_ref = unshared_level_logprobs(model, T, spec, tries, units, opts, tok.pad_token_id, tree)
    soft_cross_entropy(lp_ref, tree).backward()
    g_ref = [p.grad.clone() for p in params]
    model.zero_grad()
    levels = torch.zeros_like(lp_ref, dtype=torch.bool)
    for q, n in enumerate(tree.n_levels):
        levels[q, :n] = True
    torch.testing.assert_close(lp_tree[levels], lp_ref[levels], atol=1e-4, rtol=1e-4)
    scale = max(float(g.abs().max()) for g in g_ref)
    for a, b in zip(g_tree, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-3)
    assert tree.tokens < sum(len(tree.row_tokens(r)) for r in range(len(tree.ends)))


@pytest.fixture(scope="module")
def gemma_lora(gemma_hf: Path):
    from transformers import AutoModelForCausalLM

    return _lora(AutoModelForCausalLM.from_pretrained(gemma_hf, dtype=torch.float32, use_safetensors=True))


@pytest.mark.parametrize("task,data,permute", [
    ("emobank", "emobank-train-64.jsonl", False),
    ("convabuse", "convabuse-train-300.jsonl", True),
    ("goemotions", "goemotions-train-300.jsonl", False),
])
def test_tree_loss_and_gradients_equal_one_sequence_per_prompt(gemma_hf: Path, gemma_lora, task: str, data: str,
                                                               permute: bool) -> None:
    spec = load_spec(TASKS / f"{task}.yaml")
    tok, _ = _tok(gemma_hf)
    rng = np.random.default_rng(0)
    fields = [it.fields for it in load_items(DATA / data, spec)[:5]]
    opts = RenderOptions(1, None, {c.name: tuple(int(x) for x in rng.permutation(len(c.scale)))
                                   for c in spec.criteria})
    _compare(gemma_lora, tok, spec, _units(spec, fields, rng, permute), opts)


def test_long_items_of_several_fields_in_blocks_equal_the_dense_form_and_the_reference(gemma_hf: Path,
                                                                                       gemma_lora) -> None:
    """Items of very different lengths (padding in the blocks) with two fields and four criteria:
    the blocked attention gives the reference's loss and gradients, and the dense form's numbers."""
    spec = parse_spec(LONG, "long")
    tok, _ = _tok(gemma_hf)
    base = [it.fields for it in load_items(DATA / "convabuse-train-300.jsonl", load_spec(TASKS / "convabuse.yaml"))]
    fields = [{"dialogue": " ".join(f["prev_user"] + " " + f["prev_agent"] for f in base[k:k + 1 + 3 * (k % 3)]),
               "summary": base[k]["user"]} for k in range(4)]
    units = _units(spec, fields, np.random.default_rng(5), True)
    for dense in (False, True):
        _compare(gemma_lora, tok, spec, units, RenderOptions(1), dense)
    T = lambda s: list(tok(s)["input_ids"])  # noqa: E731
    tree = build_tree(T, spec, {c.name: build_trie(T, spec, c) for c in spec.criteria}, units, RenderOptions(1),
                      tok.pad_token_id)
    blocks = tree.blocks(None)
    sizes = torch.bincount(tree.item_of)
    assert blocks.idx.shape == (4, int(sizes.max())) and int(sizes.min()) < int(sizes.max())


def _one_dialogue(n: int) -> list[dict[str, str]]:
    """n summaries of one dialogue: items that share their leading input, as USR PersonaChat's five
    responses to each conversation do."""
    base = [it.fields for it in load_items(DATA / "convabuse-train-300.jsonl", load_spec(TASKS / "convabuse.yaml"))]
    dialogue = " ".join(f["prev_user"] + " " + f["prev_agent"] for f in base[:4])
    return [{"dialogue": dialogue, "summary": base[10 + k]["user"]} for k in range(n)]


@pytest.mark.parametrize("dense", [False, True], ids=["blocked", "dense"])
def test_items_sharing_a_context_hold_it_in_the_prefix_with_the_same_loss_and_gradients(
        gemma_hf: Path, gemma_lora, dense: bool) -> None:
    """Three summaries of one dialogue: the tree's prefix runs on through the dialogue, each item
    keeps only its own summary, and loss and gradients are still those of one prompt per row."""
    spec = parse_spec(LONG, "long")
    tok, T = _tok(gemma_hf)
    units = _units(spec, _one_dialogue(3), np.random.default_rng(2), False)
    _compare(gemma_lora, tok, spec, units, RenderOptions(1), dense)
    tries = {c.name: build_trie(T, spec, c) for c in spec.criteria}
    tree = build_tree(T, spec, tries, units, RenderOptions(1), tok.pad_token_id)
    apart = build_tree(T, spec, tries, [Unit({**u.fields, "dialogue": u.fields["dialogue"] + f" ({k})"}, u.targets)
                                        for k, u in enumerate(units)], RenderOptions(1), tok.pad_token_id)
    dialogue = len(T(units[0].fields["dialogue"]))
    assert tree.prefix_len > apart.prefix_len + dialogue - 5  # the dialogue is in the prefix, once
    assert tree.tokens < apart.tokens - 2 * dialogue + 10


def test_scoring_groups_items_by_context_and_returns_them_in_order(gemma_hf: Path, gemma_lora) -> None:
    """Validation and parity score items sharing a context in one tree each: interleaved items
    of two dialogues come back in their own order with the scores each gets alone."""
    from edge_annotator.hf.score import score_items
    from edge_annotator.runtime.data import Item

    spec = parse_spec(LONG, "long")
    tok, _ = _tok(gemma_hf)
    one, two = _one_dialogue(3), [{**f, "dialogue": f["dialogue"][: len(f["dialogue"]) // 2]} for f in _one_dialogue(3)]
    items = [Item(f"i{k}", f, "t.jsonl", k + 1) for k, f in enumerate(x for pair in zip(one, two) for x in pair)]
    together = score_items(gemma_lora, tok, spec, items)
    alone = [score_items(gemma_lora, tok, spec, [it])[0] for it in items]
    for a, b in zip(together, alone):
        for c in spec.criteria:
            np.testing.assert_allclose(list(a[c.name].probs.values()), list(b[c.name].probs.values()), atol=1e-4)


def test_answers_sharing_a_first_token_score_through_every_trie_node(gemma_hf: Path, gemma_lora) -> None:
    spec = parse_spec(TWO_LEVEL, "two-level")
    tok, T = _tok(gemma_hf)
    trie = build_trie(T, spec, spec.criteria[0])
    assert len(trie.branches) == 2  # root, and below "very"
    fields = [{"text": t} for t in ("We won the cup!", "The match was cancelled.", "Taxes rise again.")]
    _compare(gemma_lora, tok, spec, _units(spec, fields, np.random.default_rng(3), False), RenderOptions(1))


@pytest.mark.parametrize("shared", [False, True], ids=["items", "one-context"])
@pytest.mark.parametrize("dense", [False, True], ids=["blocked", "dense"])
def test_sliding_window_layers_see_what_they_would_in_the_full_prompt(tmp_path: Path, gemma_hf: Path,
                                                                      dense: bool, shared: bool) -> None:
    """A 3-layer Gemma 3 with a 24-token window (prompts are ~240 tokens): the tree masks windows by
    position, in the per-item blocks and in the dense form alike, also where the prefix runs on
    through a context the items share (the window then cuts into the prefix)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(gemma_hf)
    conf.update({"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 24,
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.25)
    tok, _ = _tok(gemma_hf)
    if shared:
        spec = parse_spec(LONG, "long")
        fields = _one_dialogue(3)
    else:
        spec = load_spec(TASKS / "emobank.yaml")
        fields = [it.fields for it in load_items(DATA / "emobank-train-64.jsonl", spec)[:4]]
    _compare(_lora(model), tok, spec, _units(spec, fields, np.random.default_rng(1), False), CANONICAL, dense)


def test_tree_rows_are_the_runtime_prompts_token_for_token(gemma_hf: Path, engine) -> None:
    """Each scoring row stands for exactly llama.cpp's tokens of the runtime prompt plus the answers' stem."""
    spec = load_spec(TASKS / "convabuse.yaml")
    tok, T = _tok(gemma_hf)
    tries = {c.name: build_trie(T, spec, c) for c in spec.criteria}
    items = load_items(DATA / "convabuse-train-300.jsonl", spec)[:6]
    units = [Unit(it.fields, [np.ones(5)], input_order=(3, 1, 0, 2)) for it in items]
    opts = RenderOptions(2, None, {"severity": (4, 0, 2, 1, 3)})
    tree = build_tree(T, spec, tries, units, opts, tok.pad_token_id)
    own = RenderOptions(2, (3, 1, 0, 2), opts.level_orders)
    for r, (u, _) in enumerate(tree.queries):
        prompt = render_prompt(spec, items[u].fields, spec.criteria[0], own)
        assert tree.row_tokens(r) == engine.tokenize(prompt) + list(tries["severity"].branches[0][0])


def test_token_dropout_only_touches_the_item_tokens(gemma_hf: Path) -> None:
    spec = load_spec(TASKS / "emobank.yaml")
    tok, T = _tok(gemma_hf)
    tries = {c.name: build_trie(T, spec, c) for c in spec.criteria}
    items = load_items(DATA / "emobank-train-64.jsonl", spec)[:3]
    t = [np.ones(5) / 5] * 3
    clean = build_tree(T, spec, tries, [Unit(it.fields, t) for it in items], CANONICAL, tok.pad_token_id)
    dropped = build_tree(T, spec, tries, [Unit(it.fields, t, drop_prob=0.5, rng=np.random.default_rng(k))
                                          for k, it in enumerate(items)], CANONICAL, tok.pad_token_id)
    a, b = clean.input_ids[0], dropped.input_ids[0]
    diff = (a != b).nonzero()[:, 0]
    assert len(diff) > 0 and bool((b[diff] == tok.pad_token_id).all())
    after = diff - clean.prefix_len
    assert bool((after >= 0).all()) and bool((clean.row_of[after] == -1).all())  # item tokens, never the cues


def test_batched_kept_tokens_build_the_very_same_tree(gemma_hf: Path) -> None:
    """Tokens (one batched call, ids kept) gives each text's own ids, so the tree is the one a
    call per text builds, the first time and from what it kept; a full store drops its oldest."""
    spec = load_spec(TASKS / "convabuse.yaml")
    tok, _ = _tok(gemma_hf)
    one = lambda s: list(tok(s, split_special_tokens=True)["input_ids"])  # noqa: E731
    tries = {c.name: build_trie(one, spec, c) for c in spec.criteria}
    items = load_items(DATA / "convabuse-train-300.jsonl", spec)[:8]
    units = [Unit(it.fields, [np.ones(5)], input_order=(3, 1, 0, 2)) for it in items]
    opts = RenderOptions(1, None, {"severity": (4, 0, 2, 1, 3)})
    ref = build_tree(one, spec, tries, units, opts, tok.pad_token_id)
    kept = Tokens(tok)
    for n in range(2):
        got = build_tree(kept, spec, tries, units, opts, tok.pad_token_id)
        for name in ("input_ids", "position_ids", "item_of", "row_of", "ends", "kids", "contrib"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), (n, name)
    texts = 1 + len(items) * 2  # the instruction, each item's head and its one prompt
    assert (kept.misses, kept.hits) == (texts, texts)
    small = Tokens(tok, capacity=2)
    words = ["<bos> stays text", "two", "three", "two"]
    assert small.many(words) == [one(w) for w in words]
    assert list(small._kept) == ["two", "three"] and small.misses == 3


def test_distribution_targets_cost_one_pass_for_all_raters(gemma_hf: Path) -> None:
    """raters: distribution makes one example per item and criterion, its target the raters' shares."""
    from edge_annotator.train.examples import build_examples

    spec = load_spec(TASKS / "emobank.yaml")
    items = load_items(DATA / "emobank-train-64.jsonl", spec)
    dist = build_examples(items, spec, "distribution")
    each = build_examples(items, spec, "each")
    assert len(dist) == len(items) and sum(e.queries for e in dist) == 3 * len(items)
    assert len(each) == sum(len(it.ratings) for it in items)
    it, ex = items[0], dist[0]
    vals = [r["Valence"] for r in it.ratings]
    np.testing.assert_allclose(ex.targets[0], [vals.count(v) / len(vals) for v in (1, 2, 3, 4, 5)])
    # the soft target is the mean of the one-hot targets `each` gives the same item
    mine = [e for e in each if e.item == 0]
    np.testing.assert_allclose(np.mean([e.targets[0] for e in mine], axis=0), ex.targets[0])


def test_config_raters_default_is_distribution_and_select_by_is_checked() -> None:
    from edge_annotator.train.config import ConfigError, TrainConfig, parse_config

    raw = yaml.safe_load((TASKS.parent / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.pop("raters", None)
    assert parse_config(raw, "t", check_paths=False).raters == "distribution"
    assert TrainConfig.__dataclass_fields__["select_by"].default == "score"
    with pytest.raises(ConfigError, match="select_by: must be one of score, label"):
        parse_config({**raw, "select_by": "mode"}, "t", check_paths=False)
