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

The figure is examples per second (forward and backward, no optimizer update, so both arms see
the same weights every step); their ratio is the speed-up.
"""

from __future__ import annotations

import json
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
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the training section of this file.")
def main(base: str, config: str, data: str, steps: int, items: int, prep_data: str, json_path: Path | None,
         md_path: Path | None) -> None:
    """Training examples/s of the token-tree step against the per-prompt step, side by side.

    \b
    Examples:
      python -m edge_annotator.bench.train --base models/gemma-3-270m-hf --markdown BENCHMARKS.md
    """
    a = Args(config, data, steps, items, prep_data)
    res = measure(base, a)
    print(json.dumps(res, indent=2))
    if json_path:
        json_path.write_text(json.dumps(res, indent=2))
    if md_path:
        from .cli import cpu_name, write_section

        write_section(md_path, "train", markdown(res, {"cpu": cpu_name(), "cores": os.cpu_count()}, a))


@dataclass(frozen=True)
class Args:
    """What the two arms run on; the markdown names it."""

    config: str
    data: str
    steps: int
    items: int
    prep_data: str


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
    res["target"] = 3.0
    res["examples_per_step"] = n_examples
    res["tokens_per_step"] = tokens
    res["lora_targets"] = cfg.lora.target_modules
    res["all_examples_per_s"] = per_s
    res["threads"] = torch.get_num_threads()
    prep_items = load_items(a.prep_data, spec)
    res["prep_items_per_s"] = prep_rates(tok, spec, prep_items, build_examples(prep_items, spec, "distribution"),
                                         tries, micro_items=64, trees=16)
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
    ])


if __name__ == "__main__":
    main()
