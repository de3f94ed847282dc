"""The small-data recipe: a training config sized from the data and a time budget, not copied by hand.

    raw = small_data_config(spec_path, train, val, base, out, items=300, criteria=2, longest=410)
    raw = fit_to_budget(raw, step_s=2.4, val_s=20.0, budget_s=1200)   # after a timed check
    raw = small_data_config(..., augment="templates")                  # one of AUGMENTATIONS

What the rules encode (docs/recipes.md has the measurements behind them):

- LoRA r=16 on every attention and MLP projection, fp32, lr 1e-3, linear decay, the raters'
  distribution as the target, checkpoints chosen by the mean of the per-criterion alphas (the
  demo recipe's setup, which learnt where q/v-only LoRA did not).
- No augmentation by default: on the demo's budget (one pass over 5,000 EmoBank sentences) the
  paper's augmentations kept the model from learning the items, and at 300 ConvAbuse items all
  three together gained nothing (docs/recipes.md); `augment="all"` turns them on, and
  AUGMENTATIONS names each alone.
- One token tree per step: as many items as fit in about TREE_TOKENS tokens, at most 16; items
  that share their leading fields (several responses to one dialogue) come together, one tree per
  context holding it once (TrainConfig.share_contexts; it applies where it saves tokens).
- Epochs: as many passes as the budget allows, at most MAX_EPOCHS over a few hundred items and
  fewer as the data grows (5,000 items: one pass); validation and early stopping choose the step.
- max_length: the longest training prompt plus its answer, with a margin, rounded up to 64.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from edge_annotator.runtime.errors import UserError

TREE_TOKENS = 3000
"""Tokens per micro-batch tree to aim for: items of ~30 tokens pack 16 to a tree (~700 tokens with
the instruction), items of ~300 tokens about 9."""
MAX_ITEMS_PER_TREE = 16
MAX_EPOCHS = 12
ITEM_PASSES = 5000
"""Item passes the epoch cap aims at: 300 items -> 12 epochs (capped), 1,000 -> 5, 5,000 -> 1."""


_OFF = {"templates": False, "permute_inputs": False, "shuffle_labels": False,
        "token_dropout": {"prob": 0.0, "fraction": 0.0}}
_DROPOUT = {"prob": 0.1, "fraction": 0.5}
AUGMENTATIONS: dict[str, dict[str, Any]] = {
    "none": _OFF,
    "all": {"templates": True, "permute_inputs": True, "shuffle_labels": True, "token_dropout": _DROPOUT},
    "templates": _OFF | {"templates": True, "shuffle_labels": True},
    "permute": _OFF | {"permute_inputs": True},
    "dropout": _OFF | {"token_dropout": _DROPOUT},
}
"""The paper's augmentations by name, each a config's `augment` block: all three, each alone, or
none. "templates" draws a paraphrased instruction and shuffles the order the levels are listed in
(both are the rubric's wording); "permute" shuffles the input fields' order; "dropout" drops 10%
of an item's tokens in half of its examples."""


def augmentation(name: str) -> dict[str, Any]:
    """AUGMENTATIONS[name], a copy of its own (ValueError naming the choices for any other name)."""
    if name not in AUGMENTATIONS:
        raise UserError(f"augment: {name!r} is none of {', '.join(AUGMENTATIONS)}")
    return copy.deepcopy(AUGMENTATIONS[name])


def items_per_tree(longest: int, criteria: int, prefix: int = 200) -> int:
    """Items per tree so that the tree stays near TREE_TOKENS (an item's tokens plus a cue per criterion)."""
    per_item = max(longest - prefix, 16) + 8 * criteria
    return max(1, min(MAX_ITEMS_PER_TREE, (TREE_TOKENS - prefix) // per_item))


def epochs_for(items: int) -> float:
    return float(max(1, min(MAX_EPOCHS, round(ITEM_PASSES / max(items, 1)))))


def small_data_config(spec: str, train_data: str, val_data: str, base_model: str, output: str, *, items: int,
                      criteria: int, longest: int, seed: int = 0, augment: str = "none",
                      context: int = 1) -> dict[str, Any]:
    """A TrainConfig's fields (YAML-able) for `items` training items with `criteria` criteria whose
    longest prompt plus answer is `longest` tokens, with the augmentation named `augment`
    (AUGMENTATIONS). `context`: how many items typically share their leading fields (five
    responses to each dialogue: 5); a step then takes whole contexts, each one tree that holds its
    context once, rather than a context cut in two and held twice."""
    per_tree = items_per_tree(longest, criteria)
    if context > 1:
        per_tree = context * max(1, round(per_tree / context))
    steps_per_epoch = math.ceil(items / per_tree)
    epochs = epochs_for(items)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    return {
        "base_model": base_model, "spec": spec, "train_data": train_data, "val_data": val_data, "output": output,
        "raters": "distribution", "select_by": "score",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "quantization": "none", "compute_dtype": "float32",
        "device": "cpu", "lr": 1.0e-3, "schedule": "linear", "warmup_ratio": 0.03,
        "epochs": epochs, "max_steps": total,
        "batch_size": per_tree * criteria, "micro_batch": per_tree * criteria,
        "eval_every": _eval_every(total), "patience": 4,
        "max_length": int(math.ceil((longest + 16) / 64) * 64), "seed": seed, "share_contexts": True,
        "augment": augmentation(augment),
    }


MIN_STEPS = 10
"""The fewest steps a budget may buy: fewer train next to nothing (the first is the warm-up's, at
lr 0) and leave the base's own answers, which a 4-bit file does not keep within parity."""


class BudgetTooSmall(UserError, ValueError):
    """The time budget pays for fewer than MIN_STEPS steps."""


def _eval_every(steps: int) -> int:
    return max(5, math.ceil(steps / 8))


def fit_to_budget(raw: dict[str, Any], step_s: float, val_s: float, budget_s: float, repeat_s: float | None = None,
                  pass_steps: int | None = None) -> dict[str, Any]:
    """The same config with max_steps cut to what the budget pays for (never more than the epoch cap
    gave), and validations spaced to about 8 in the run: check.estimate_seconds of the result
    (steps, validations, merge, the calibration's two scorings) is within the budget. Raises
    BudgetTooSmall, naming the budget that would do, when it pays for fewer than MIN_STEPS steps."""
    from .check import estimate_seconds

    def cost(steps: int) -> float:
        return estimate_seconds(steps, _eval_every(steps), step_s, val_s, True, repeat_s, pass_steps)

    cap = int(raw["max_steps"])
    steps = min(cap, MIN_STEPS)
    if cost(steps) > budget_s:
        raise BudgetTooSmall(
            f"a budget of {budget_s:.0f}s pays for fewer than {steps} training steps ({step_s:.1f}s a step, "
            f"{val_s:.1f}s a validation, {cost(0):.0f}s of validation and merge): give --budget "
            f"{math.ceil(cost(steps) / 10) * 10:.0f}s or more")
    while steps < cap and cost(steps + 1) <= budget_s:
        steps += 1
    return {**raw, "max_steps": steps, "eval_every": _eval_every(steps)}
