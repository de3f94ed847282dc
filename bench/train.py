"""Training throughput: token-tree steps against the step before them, side by side.

    python -m edge_annotator.bench.train --base models/gemma-3-270m-hf     # make bench-train

Gemma 3 270M in fp32 on the CPU with the demo recipe's LoRA, real EmoBank items, every criterion
of each. Both arms train on the very same examples (one criterion of one item each) and are timed
alternately, step by step, in one process, so machine drift hits both alike:

- per-prompt (the trainer before token trees): every example is its own sequence, the
  runtime prompt plus the answer, in micro-batches of 4, the vocabulary head at the answer
  position and cross-entropy over the whole vocabulary;
- tree (hf/tree.py, today's trainer): one sequence per micro-batch, the instruction once,
  each item once for all its criteria, each criterion's cue a branch, the head restricted to the
  answer tokens, soft targets.

A long-input arm then times tree steps over long two-field items with four criteria, at several
micro-batch sizes, with the trainer's per-item blocked attention and the dense form before it;
and items that share their dialogue, five to each, packed apart and by context.

The figure is examples per second (forward and backward, no optimizer update, so both arms see
the same weights every step); their ratio is the speed-up.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import yaml

from edge_annotator.runtime.prompt import CANONICAL, render_example


def per_prompt_step(model: Any, tok: Any, spec: Any, items: list[Any], examples: list[Any], micro: int) -> int:
    """The trainer's step before token trees; returns the tokens it processed."""
    causal = model.get_base_model()
    seqs: list[tuple[list[int], int]] = []
    for ex in examples:
        for ci, c in enumerate(spec.criteria):
            t = ex.targets[ci]
            if t is None:
                continue
            prompt, answer = render_example(spec, items[ex.item].fields, c, c.values[int(np.argmax(t))], CANONICAL)
            p, full = tok(prompt)["input_ids"], tok(prompt + answer)["input_ids"]
            seqs.append((full, len(p)))
    n_tok = 0
    for s in range(0, len(seqs), micro):
        chunk = seqs[s:s + micro]
        width = max(len(f) for f, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows, cols, targets = [], [], []
        for r, (full, n_prompt) in enumerate(chunk):
            ids[r, : len(full)] = torch.tensor(full)
            mask[r, : len(full)] = 1
            for k in range(n_prompt, len(full)):
                rows.append(r)
                cols.append(k - 1)  # the logits at k-1 predict token k
                targets.append(full[k])
        hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = causal.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum").backward()
        n_tok += int(mask.sum())
    return n_tok


def tree_step(model: Any, tok: Any, spec: Any, items: list[Any], examples: list[Any], tries: Any,
              micro_items: int) -> int:
    from edge_annotator.hf.tree import build_tree, level_logprobs, soft_cross_entropy, tree_attention
    from edge_annotator.train.examples import unit_of

    T = lambda s: list(tok(s)["input_ids"])  # noqa: E731
    n_tok = 0
    with tree_attention(model):
        for s in range(0, len(examples), micro_items):
            units = [unit_of(ex, items, spec, None, np.random.default_rng(0)) for ex in examples[s:s + micro_items]]
            tree = build_tree(T, spec, tries, units, CANONICAL, tok.pad_token_id)
            soft_cross_entropy(level_logprobs(model, tree), tree).backward()
            n_tok += tree.tokens
    return n_tok


def prep_rates(tok: Any, spec: Any, items: list[Any], examples: list[Any], tries: Any, micro_items: int,
               trees: int, repeats: int = 3) -> dict[str, float]:
    """Items per second of building token trees (the trainer's CPU work per step, no model), three ways:
    one tokenizer call per text (the trainer before hf/tree.py's Tokens), Tokens on texts not seen
    before (one batched call per tree), and Tokens again on the same trees (a second epoch without
    augmentation). Medians of `repeats`."""
    from edge_annotator.hf.tree import Tokens, build_tree
    from edge_annotator.train.examples import unit_of

    one = lambda s: list(tok(s, split_special_tokens=True)["input_ids"])  # noqa: E731
    chunks = [[unit_of(examples[(t * micro_items + k) % len(examples)], items, spec, None, np.random.default_rng(0))
               for k in range(micro_items)] for t in range(trees)]
    rates: dict[str, list[float]] = {"per_text": [], "batched": [], "kept": []}
    for _ in range(repeats):
        kept = Tokens(tok)
        for arm, T in (("per_text", one), ("batched", kept), ("kept", kept)):
            t0 = time.perf_counter()
            for units in chunks:
                build_tree(T, spec, tries, units, CANONICAL, tok.pad_token_id)
            rates[arm].append(trees * micro_items / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


# Long, two-field items with four criteria (the shape of a dialogue-summary task): a "dialogue" of
# consecutive EmoBank sentences (about 250 tokens) and one more sentence as its "summary".
LONG_CRITERIA = ("Coherence", "Consistency", "Fluency", "Relevance")
LONG_SPEC = {
    "name": "long-two-fields",
    "inputs": [{"name": "dialogue", "title": "Dialogue"}, {"name": "summary", "title": "Summary"}],
    "criteria": [{"name": n, "level": "ordinal", "description": f"The summary's {n.lower()}.",
                  "scale": [{"value": v, "anchor": a} for v, a in
                            zip(range(1, 6), ["very poor", "poor", "fair", "good", "very good"])]}
                 for n in LONG_CRITERIA],
    "templates": ["Rate how well the summary renders the dialogue, on each criterion below.\n\n{rubric}"],
    "answer_cue": "{criterion} ({min}-{max}):",
}


def long_items(path: str, n: int, tokens: int, tok: Any) -> list[Any]:
    """n items whose dialogue is about `tokens` tokens of consecutive sentences of `path`, each rated
    by two made-up raters (the ratings do not matter to throughput)."""
    from edge_annotator.runtime.data import Item, iter_rows

    sents = [r.data["text"] for r in iter_rows(path) if r.data]
    out, k = [], 0
    rng = np.random.default_rng(0)
    for i in range(n):
        parts: list[str] = []
        while len(tok(" ".join(parts))["input_ids"]) < tokens:
            parts.append(sents[k % len(sents)])
            k += 1
        ratings: list[dict[str, int | float | str]] = [{n: int(rng.integers(1, 6)) for n in LONG_CRITERIA}
                                                       for _ in range(2)]
        out.append(Item(f"long-{i}", {"dialogue": " ".join(parts), "summary": sents[(k + 7) % len(sents)]},
                        path, i + 1, ratings=ratings))
    return out


DENSE_GB = 12.0
"""The dense form keeps (N - Lp)^2 fp32 scores and probabilities per head and layer for the backward
pass; above this many GB (estimated) it is not run: a 24-item micro-batch of long items would need about 34."""


def dense_gb(model: Any, tree: Any) -> float:
    cfg = model.get_base_model().config
    m = tree.tokens - tree.prefix_len
    return 2 * 4 * m * m * cfg.num_attention_heads * cfg.num_hidden_layers / 1e9


def measure_long(model: Any, tok: Any, data: str, micros: tuple[int, ...], steps: int,
                 item_tokens: int = 250) -> list[dict[str, Any]]:
    """Per micro-batch size: examples/s and tokens/s of one tree step over long items, with the
    per-item blocked attention and the dense (N - Lp)^2 form, alternating step by step."""
    from edge_annotator.hf.score import answer_tries
    from edge_annotator.hf.tree import build_tree, level_logprobs, soft_cross_entropy, tree_attention
    from edge_annotator.runtime.spec import parse_spec
    from edge_annotator.train.examples import build_examples, unit_of

    spec = parse_spec(LONG_SPEC, "long-two-fields")
    items = long_items(data, max(micros) * (steps + 1), item_tokens, tok)
    examples = build_examples(items, spec, "distribution")
    tries = answer_tries(tok, spec)
    T = lambda s: list(tok(s)["input_ids"])  # noqa: E731
    rows = []
    for micro in micros:
        rates: dict[str, list[float]] = {"blocked": [], "dense": []}
        n_tok = n_ex = 0
        for step in range(steps + 1):
            batch = examples[step * micro:(step + 1) * micro]
            units = [unit_of(ex, items, spec, None, np.random.default_rng(0)) for ex in batch]
            tree = build_tree(T, spec, tries, units, CANONICAL, tok.pad_token_id)
            n_tok, n_ex = tree.tokens, sum(e.queries for e in batch)
            arms = ("blocked", "dense") if step % 2 == 0 else ("dense", "blocked")
            for arm in arms if dense_gb(model, tree) <= DENSE_GB else ("blocked",):
                t0 = time.perf_counter()
                with tree_attention(model, dense=arm == "dense"):
                    soft_cross_entropy(level_logprobs(model, tree), tree).backward()
                model.zero_grad(set_to_none=True)
                if step > 0:
                    rates[arm].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"items": micro, "examples": n_ex, "tokens": n_tok,
                               "dense_scores_gb": round(dense_gb(model, tree), 1)}
        for arm, secs in rates.items():
            sec = statistics.median(secs) if secs else float("nan")
            row[arm] = {"examples_per_s": n_ex / sec, "tokens_per_s": n_tok / sec, "seconds": sec} if secs else None
        row["ratio"] = row["blocked"]["examples_per_s"] / row["dense"]["examples_per_s"] if row["dense"] else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def measure_shared(model: Any, tok: Any, data: str, steps: int, per_context: int = 5, contexts: int = 2,
                   item_tokens: int = 250) -> dict[str, Any]:
    """Examples/s of one step over `contexts` dialogues with `per_context` summaries each (USR
    PersonaChat's shape: five responses to each conversation): as one tree whose prefix is the
    instruction alone (a plain shuffle's micro-batch, every item carrying its dialogue) and as one
    tree per dialogue whose prefix holds it once (share_contexts), alternating step by step."""
    from edge_annotator.hf.score import answer_tries
    from edge_annotator.hf.tree import build_tree, level_logprobs, soft_cross_entropy, tree_attention
    from edge_annotator.runtime.data import Item
    from edge_annotator.runtime.spec import parse_spec
    from edge_annotator.train.examples import build_examples, unit_of

    spec = parse_spec(LONG_SPEC, "long-two-fields")
    firsts = long_items(data, contexts * (steps + 1), item_tokens, tok)
    items = [Item(f"{it.id}-{k}", {**it.fields, "summary": firsts[(i + k + 1) % len(firsts)].fields["summary"]},
                  it.path, it.line, ratings=it.ratings) for i, it in enumerate(firsts) for k in range(per_context)]
    examples = build_examples(items, spec, "distribution")
    tries = answer_tries(tok, spec)
    T = lambda s: list(tok(s)["input_ids"])  # noqa: E731
    micro = per_context * contexts
    secs: dict[str, list[float]] = {"apart": [], "by_context": []}
    tokens: dict[str, int] = {}
    n_ex = 0
    for step in range(steps + 1):
        batch = examples[step * micro:(step + 1) * micro]
        units = [unit_of(ex, items, spec, None, np.random.default_rng(0)) for ex in batch]
        n_ex = sum(e.queries for e in batch)
        forms = {"apart": [units], "by_context": [units[c:c + per_context] for c in range(0, micro, per_context)]}
        for arm in (("apart", "by_context") if step % 2 == 0 else ("by_context", "apart")):
            trees = [build_tree(T, spec, tries, u, CANONICAL, tok.pad_token_id) for u in forms[arm]]
            tokens[arm] = sum(t.tokens for t in trees)
            t0 = time.perf_counter()
            with tree_attention(model):
                for tree in trees:
                    soft_cross_entropy(level_logprobs(model, tree), tree).backward()
            model.zero_grad(set_to_none=True)
            if step > 0:
                secs[arm].append(time.perf_counter() - t0)
    res: dict[str, Any] = {"items": micro, "per_context": per_context, "examples": n_ex}
    for arm, v in secs.items():
        sec = statistics.median(v)
        res[arm] = {"examples_per_s": n_ex / sec, "tokens": tokens[arm], "seconds": sec}
    res["ratio"] = res["by_context"]["examples_per_s"] / res["apart"]["examples_per_s"]
    print(json.dumps(res), flush=True)
    return res


def measure_passes(base: str, cfg: Any, tok: Any, data: str, top: int, items: int = 300, steps: int = 2,
                   item_tokens: int = 250, budget_s: float = 1200.0) -> dict[str, Any]:
    """Passes over `items` long items that a budget buys, with fit's recipe (train/recipe.py: LoRA on
    every layer, one tree of items_per_tree items a step) against LoRA on the top `top` layers with
    the frozen layers' states kept (hf/frozen.py), and the same top-layer LoRA without them.

    Each arm times `steps` steps after a warm-up, in turn step by step. The kept arm's first pass
    runs the frozen layers once per item (its "first" steps, trees it has not seen); its later
    passes run the top layers alone (the same trees again). Passes in the budget: budget / pass for
    the whole model; 1 + (budget - first pass) / later pass for the kept states."""
    from edge_annotator.hf.frozen import FrozenLayers
    from edge_annotator.hf.score import answer_tries
    from edge_annotator.hf.tree import build_tree, level_logprobs, soft_cross_entropy, tree_attention
    from edge_annotator.runtime.spec import parse_spec
    from edge_annotator.train.examples import build_examples, unit_of
    from edge_annotator.train.model import add_lora, load_base
    from edge_annotator.train.recipe import items_per_tree

    spec = parse_spec(LONG_SPEC, "long-two-fields")
    per_tree = items_per_tree(item_tokens + 200, len(LONG_CRITERIA))
    long = long_items(data, per_tree * (steps + 1), item_tokens, tok)
    examples = build_examples(long, spec, "distribution")
    tries = answer_tries(tok, spec)
    T = lambda s: list(tok(s)["input_ids"])  # noqa: E731
    trees = [build_tree(T, spec, tries, [unit_of(ex, long, spec, None, np.random.default_rng(0))
                                         for ex in examples[k * per_tree:(k + 1) * per_tree]], CANONICAL,
                        tok.pad_token_id) for k in range(steps + 1)]
    L = int(json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"])
    models = {"whole": add_lora(load_base(cfg, torch.device("cpu")), with_lora(cfg, None)),
              "top": add_lora(load_base(cfg, torch.device("cpu")), with_lora(cfg, list(range(L - top, L))))}
    for m in models.values():
        m.train()
    frozen = FrozenLayers(L - top)
    secs: dict[str, list[float]] = {"whole": [], "top": [], "first": [], "later": []}

    def run(arm: str, tree: Any) -> float:
        model = models["whole" if arm == "whole" else "top"]
        t0 = time.perf_counter()
        with tree_attention(model):
            soft_cross_entropy(level_logprobs(model, tree, frozen if arm in ("first", "later") else None),
                               tree).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for k, tree in enumerate(trees):
        for arm in (("whole", "top") if k % 2 == 0 else ("top", "whole")) + ("first", "later"):
            dt = run(arm, tree)
            if k > 0:
                secs[arm].append(dt)
    steps_per_pass = math.ceil(items / per_tree)
    sec = {arm: statistics.median(v) for arm, v in secs.items()}
    pass_s = {arm: sec[arm] * steps_per_pass for arm in sec}
    kept_bytes = frozen.bytes / (per_tree * (steps + 1)) * items
    res = {
        "items": items, "item_tokens": item_tokens, "items_per_tree": per_tree, "steps_per_pass": steps_per_pass,
        "layers": L, "top": top, "tokens_per_tree": statistics.median(t.tokens for t in trees),
        "examples_per_tree": len(examples[:per_tree]) * len(LONG_CRITERIA), "seconds": sec, "pass_s": pass_s,
        "budget_s": budget_s, "kept_gb_for_items": kept_bytes / 1e9,
        "passes": {"whole": budget_s / pass_s["whole"], "top": budget_s / pass_s["top"],
                   "kept": (1 + (budget_s - pass_s["first"]) / pass_s["later"]) if pass_s["first"] < budget_s
                   else budget_s / pass_s["first"]},
    }
    res["ratio"] = res["passes"]["kept"] / res["passes"]["whole"]
    print(json.dumps(res), flush=True)
    return res


def with_lora(cfg: Any, layers: list[int] | None) -> Any:
    """cfg with fit's LoRA (train/recipe.py: small_data_config) on `layers` (None: every layer)."""
    from dataclasses import replace

    from edge_annotator.train.config import LoraSettings

    return replace(cfg, lora=LoraSettings(r=16, alpha=32, dropout=0.0, layers=layers))


@click.command()
@click.option("--base", default="models/gemma-3-270m-hf", show_default=True, help="The HF base folder.")
@click.option("--config", default="configs/gemma3-270m-lora-cpu-emobank.yaml", show_default=True)
@click.option("--data", default="data/emobank-train-400.jsonl", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=4, show_default=True,
              help="Timed steps per arm (after one warm-up each).")
@click.option("--items", type=click.IntRange(1), default=16, show_default=True,
              help="Items per step (each with all its criteria).")
@click.option("--prep-data", default="data/emobank-train-5000.jsonl", show_default=True,
              help="Items for the tree-building arms (the GPU recipe's micro-batch of 64 sentences).")
@click.option("--long-micro", default="3,12,24", show_default=True,
              help="Micro-batch sizes (items) of the long-input arm; empty to skip it.")
@click.option("--long-steps", type=click.IntRange(1), default=2, show_default=True,
              help="Timed steps per attention form and size in the long-input arm (after a warm-up).")
@click.option("--top-layers", type=click.IntRange(0), default=4, show_default=True,
              help="The passes arm: LoRA on this many top layers with the frozen layers' states kept; 0 skips it.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the training section of this file.")
def main(base: str, config: str, data: str, steps: int, items: int, prep_data: str, long_micro: str,
         long_steps: int, top_layers: int, json_path: Path | None, md_path: Path | None) -> None:
    """Training examples/s of the token-tree step against the per-prompt step, side by side.

    \b
    Examples:
      python -m edge_annotator.bench.train --base models/gemma-3-270m-hf --markdown docs/benchmarks.md
    """
    micros = tuple(int(x) for x in long_micro.split(",") if x.strip())
    a = Args(config, data, steps, items, prep_data, micros, long_steps, top_layers)
    res = measure(base, a)
    print(json.dumps(res, indent=2))
    if json_path:
        json_path.write_text(json.dumps(res, indent=2))
    if md_path:
        from edge_annotator.bench.markdown import write_section

        from .cli import cpu_name

        write_section(md_path, "train", markdown(res, {"cpu": cpu_name(), "cores": os.cpu_count()}, a))


@dataclass(frozen=True)
class Args:
    """What the two arms run on; the markdown names it."""

    config: str
    data: str
    steps: int
    items: int
    prep_data: str
    long_micro: tuple[int, ...] = ()
    long_steps: int = 2
    top_layers: int = 4


def measure(base: str, a: Args) -> dict[str, Any]:
    from edge_annotator.hf.score import answer_tries
    from edge_annotator.runtime.spec import load_spec
    from edge_annotator.train.config import parse_config
    from edge_annotator.train.examples import build_examples, load_items
    from edge_annotator.train.model import add_lora, load_base, load_tokenizer

    raw = yaml.safe_load(Path(a.config).read_text())
    raw.update(base_model=base)
    cfg = parse_config(raw, a.config)
    torch.manual_seed(0)
    spec = load_spec(cfg.spec)
    tok = load_tokenizer(cfg.base_model)
    items = load_items(a.data, spec)
    examples = build_examples(items, spec, "distribution")
    tries = answer_tries(tok, spec)
    model = add_lora(load_base(cfg, torch.device("cpu")), cfg)
    model.train()
    arms = ("per_prompt", "tree")
    per_s: dict[str, list[float]] = {k: [] for k in arms}
    tokens: dict[str, int] = {}
    n_examples = 0
    for step in range(a.steps + 1):
        batch = [examples[(step * a.items + k) % len(examples)] for k in range(a.items)]
        n_examples = sum(e.queries for e in batch)
        for arm in (arms if step % 2 == 0 else arms[::-1]):
            t0 = time.perf_counter()
            tokens[arm] = (per_prompt_step(model, tok, spec, items, batch, 4) if arm == "per_prompt"
                           else tree_step(model, tok, spec, items, batch, tries, a.items))
            model.zero_grad(set_to_none=True)  # no update: both arms see the same weights every step
            if step > 0:  # the first step of each arm is a warm-up
                per_s[arm].append(n_examples / (time.perf_counter() - t0))
    res: dict[str, Any] = {f"{k}_examples_per_s": statistics.median(v) for k, v in per_s.items()}
    res["ratio"] = res["tree_examples_per_s"] / res["per_prompt_examples_per_s"]
    res["tree_tokens_per_s"] = res["tree_examples_per_s"] * tokens["tree"] / n_examples
    res["target"] = 3.0
    res["examples_per_step"] = n_examples
    res["tokens_per_step"] = tokens
    res["lora_targets"] = cfg.lora.target_modules
    res["all_examples_per_s"] = per_s
    res["threads"] = torch.get_num_threads()
    prep_items = load_items(a.prep_data, spec)
    res["prep_items_per_s"] = prep_rates(tok, spec, prep_items, build_examples(prep_items, spec, "distribution"),
                                         tries, micro_items=64, trees=16)
    if a.long_micro:
        res["long"] = measure_long(model, tok, a.data, a.long_micro, a.long_steps)
        res["shared"] = measure_shared(model, tok, a.data, a.long_steps)
    if a.top_layers:
        del model  # the passes arm loads its own two
        res["passes"] = measure_passes(base, cfg, tok, a.data, a.top_layers, steps=a.long_steps)
    return res


def markdown(res: dict[str, Any], m: dict[str, Any], a: Args) -> str:
    pp, tr = res["per_prompt_examples_per_s"], res["tree_examples_per_s"]
    prep = res["prep_items_per_s"]
    met = "met" if res["ratio"] >= res["target"] else "NOT met"
    return "\n".join([
        "## Training throughput",
        "",
        f"Measured by `make bench-train` on {m['cpu']}, {m['cores']} cores, {res['threads']} threads: Gemma 3 270M "
        f"fp32, LoRA r=16 on {', '.join(res['lora_targets'])} (`{a.config}`), {a.items} EmoBank items of "
        f"`{a.data}` per step with all 3 criteria ({res['examples_per_step']} examples), forward and backward, the "
        f"two arms alternating on the same examples in one process; medians of {a.steps} steps each after a "
        "warm-up.",
        "",
        "| step | examples/s | tokens per step |",
        "|---|---|---|",
        f"| one sequence per example (the trainer before token trees; full-vocabulary loss) | {pp:.2f} | "
        f"{res['tokens_per_step']['per_prompt']} |",
        f"| token tree (hf/tree.py: shared instruction, one pass per item, restricted head) | {tr:.2f} | "
        f"{res['tokens_per_step']['tree']} |",
        "",
        f"Ratio {res['ratio']:.2f}x (target >= {res['target']:.0f}x: {met}).",
        "",
        "Building the trees (the CPU work of a step, no model; what a GPU step waits for unless it is done "
        "ahead): 16 trees of 64 sentences of "
        f"`{a.prep_data}`, the GPU recipe's micro-batch, medians of 3 rounds. The trainer builds step k + 1's trees "
        "in a thread while step k runs.",
        "",
        "| building the trees | sentences/s |",
        "|---|---|",
        f"| one tokenizer call per text (before) | {prep['per_text']:.0f} |",
        f"| Tokens: one batched call per tree, texts new | {prep['batched']:.0f} |",
        f"| Tokens: the same texts again (an epoch after the first, no augmentation) | {prep['kept']:.0f} |",
        "",
        *long_markdown(res, a),
        *passes_markdown(res, a),
    ])


def long_markdown(res: dict[str, Any], a: Args) -> list[str]:
    rows = res.get("long")
    if not rows:
        return []

    def cell(r: dict[str, Any] | None, k: str) -> str:
        return f"{r[k]:.2f}" if r and k == "examples_per_s" else f"{r[k]:.0f}" if r else "not run"

    out = [
        "### Long inputs",
        "",
        "Items of two fields (a dialogue of about 250 tokens of consecutive EmoBank sentences and a one-sentence "
        "summary) with four 1-5 criteria (`bench/train.py: LONG_SPEC`), the same model and LoRA, one token tree "
        f"per micro-batch, forward and backward; per-item blocked attention (`hf/tree.py`, the trainer's) against "
        f"the dense form (every token after the prefix against every other, then masked), alternating, medians of "
        f"{a.long_steps} steps after a warm-up. Short sentences, the tree arm above: "
        f"{res['tree_tokens_per_s']:.0f} tokens/s.",
        "",
        "| items per micro-batch | examples | tokens | blocked examples/s | blocked tokens/s | dense examples/s "
        "| dense tokens/s | blocked / dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else f"dense not run ({r['dense_scores_gb']:.0f} GB of scores)"
        out.append(f"| {r['items']} | {r['examples']} | {r['tokens']} | {cell(r['blocked'], 'examples_per_s')} | "
                   f"{cell(r['blocked'], 'tokens_per_s')} | {cell(r['dense'], 'examples_per_s')} | "
                   f"{cell(r['dense'], 'tokens_per_s')} | {ratio} |")
    sh = res.get("shared")
    if sh:
        out += [
            "",
            f"Items sharing a context (`bench/train.py: measure_shared`): {sh['items']} items per step, "
            f"{sh['per_context']} summaries of each of {sh['items'] // sh['per_context']} dialogues, the shape of "
            "USR PersonaChat's five responses per conversation; the same blocked attention, alternating, medians "
            f"of {a.long_steps} steps after a warm-up.",
            "",
            "| one step of these items | tokens | examples/s |",
            "|---|---|---|",
            f"| one tree, the instruction as its prefix (each item carries its dialogue: a plain shuffle) | "
            f"{sh['apart']['tokens']} | {sh['apart']['examples_per_s']:.2f} |",
            f"| one tree per dialogue, held once in its prefix (`share_contexts`, the trainer's default) | "
            f"{sh['by_context']['tokens']} | {sh['by_context']['examples_per_s']:.2f} |",
            "",
            f"Ratio {sh['ratio']:.2f}x.",
        ]
    return out + [""]


def passes_markdown(res: dict[str, Any], a: Args) -> list[str]:
    p = res.get("passes")
    if not p:
        return []
    sec, ps, n = p["seconds"], p["pass_s"], p["passes"]
    return [
        "### Passes over long items in a budget",
        "",
        f"{p['items']} items of the long spec above (a dialogue of about {p['item_tokens']} tokens and a summary, "
        f"four criteria), {p['items_per_tree']} to a tree ({p['steps_per_pass']} steps a pass, about "
        f"{p['tokens_per_tree']:.0f} tokens and {p['examples_per_tree']} examples a step): fit's recipe, LoRA r=16 "
        f"on every projection of all {p['layers']} layers, against the same LoRA on the top {p['top']} layers "
        "alone, without and with the frozen layers' states kept (`hf/frozen.py`: the layers below the adapter "
        "run once per token, without gradients; later passes run the top layers from the kept states, with the "
        "same loss and gradients, `tests/test_frozen.py`). Forward and backward, medians of "
        f"{a.long_steps} steps after a warm-up, the arms in turn; a pass is a step times {p['steps_per_pass']}, "
        "validation not counted.",
        "",
        f"| step | seconds a step | seconds a pass | passes in {p['budget_s'] / 60:.0f} minutes |",
        "|---|---|---|---|",
        f"| LoRA on every layer (fit's recipe) | {sec['whole']:.2f} | {ps['whole']:.0f} | {n['whole']:.1f} |",
        f"| LoRA on the top {p['top']} layers, the whole model run | {sec['top']:.2f} | {ps['top']:.0f} | "
        f"{n['top']:.1f} |",
        f"| the same, frozen states kept: first pass / later passes | {sec['first']:.2f} / {sec['later']:.2f} | "
        f"{ps['first']:.0f} / {ps['later']:.0f} | {n['kept']:.1f} |",
        "",
        f"Ratio {p['ratio']:.2f}x the passes of fit's recipe (target: 8 passes in 20 minutes). The kept states of "
        f"all {p['items']} items: {p['kept_gb_for_items']:.2f} GB.",
        "",
    ]


if __name__ == "__main__":
    main()
