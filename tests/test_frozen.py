"""The frozen layers' kept states (hf/frozen.py) give the full forward's loss and gradients.

An adapter on the top layers only; trees run once through the whole model and once through the
kept states (filled by one tree, then read by trees that pack the same items differently, with a
context in the prefix, or with token dropout), on the real Gemma 3 270M (sliding-window layers)
and on the tiny Qwen3 and Llama 3 bases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, TASKS
from test_tree import LONG, _one_dialogue, _units

from edge_annotator.hf.frozen import FrozenLayers, only_layers, supported
from edge_annotator.hf.tree import Unit, build_tree, level_logprobs, soft_cross_entropy, tree_attention
from edge_annotator.runtime.annotator import build_trie
from edge_annotator.runtime.prompt import RenderOptions
from edge_annotator.runtime.spec import load_spec, parse_spec
from edge_annotator.train.examples import load_items


def _top_lora(model: torch.nn.Module, top: int) -> tuple[torch.nn.Module, int]:
    from peft import LoraConfig, get_peft_model

    L = model.config.num_hidden_layers
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         lora_dropout=0.0, layers_to_transform=list(range(L - top, L))))
    torch.manual_seed(1)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return m, L - top


def _loss_and_grads(model: torch.nn.Module, tree, frozen: FrozenLayers | None) -> tuple[torch.Tensor, list]:
    params = [p for p in model.parameters() if p.requires_grad]
    with tree_attention(model):
        lp = level_logprobs(model, tree, frozen)
    soft_cross_entropy(lp, tree).backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    return lp.detach(), grads


def _same(model: torch.nn.Module, tree, frozen: FrozenLayers) -> None:
    lp_full, g_full = _loss_and_grads(model, tree, None)
    lp_kept, g_kept = _loss_and_grads(model, tree, frozen)
    levels = torch.zeros_like(lp_full, dtype=torch.bool)
    for q, n in enumerate(tree.n_levels):
        levels[q, :n] = True
    torch.testing.assert_close(lp_kept[levels], lp_full[levels], atol=1e-5, rtol=1e-5)
    scale = max(float(g.abs().max()) for g in g_full)
    assert scale > 0
    for a, b in zip(g_kept, g_full):
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)


def _long_units(seed: int) -> tuple[list[Unit], list[Unit]]:
    spec = parse_spec(LONG, "long")
    base = [it.fields for it in load_items(DATA / "convabuse-train-300.jsonl", load_spec(TASKS / "convabuse.yaml"))]
    fields = [{"dialogue": " ".join(f["prev_user"] + " " + f["prev_agent"] for f in base[k:k + 1 + 2 * (k % 3)]),
               "summary": base[k]["user"]} for k in range(5)]
    units = _units(spec, fields, np.random.default_rng(seed), False)
    shared = _units(spec, _one_dialogue(3), np.random.default_rng(seed + 1), False)
    return units, shared


def _check(model: torch.nn.Module, tok, first: int) -> None:
    spec = parse_spec(LONG, "long")
    T = lambda s: list(tok(s)["input_ids"])  # noqa: E731
    tries = {c.name: build_trie(T, spec, c) for c in spec.criteria}
    opts = RenderOptions(1)
    units, shared = _long_units(3)

    def tree(us: list[Unit]):
        return build_tree(T, spec, tries, us, opts, tok.pad_token_id)

    frozen = FrozenLayers(first)
    _same(model, tree(units[:4]), frozen)  # fills: the frozen layers run once, without gradients
    assert (frozen.misses, frozen.hits) == (1, 0) and frozen.kept > 0
    kept = frozen.kept
    _same(model, tree([units[2], units[0]]), frozen)  # the same items packed otherwise: all kept
    _same(model, tree([units[3]]), frozen)
    assert (frozen.misses, frozen.hits, frozen.kept) == (1, 2, kept)
    _same(model, tree([units[1], units[4]]), frozen)  # a new item: runs the frozen layers again
    assert frozen.misses == 2 and frozen.kept > kept
    _same(model, tree(shared), frozen)  # the dialogue held in the prefix
    _same(model, tree(shared[1:]), frozen)
    assert frozen.hits == 3
    rng = np.random.default_rng(0)
    dropped = [Unit(u.fields, u.targets, drop_prob=0.3, rng=rng) for u in units[:2]]
    _same(model, tree(dropped), frozen)  # tokens dropped: new nodes, still the full forward's numbers
    assert frozen.misses == 4
    tight = FrozenLayers(first, max_bytes=0)  # nothing may be kept: every tree runs the frozen layers
    _same(model, tree(units[:2]), tight)
    _same(model, tree(units[:2]), tight)
    assert (tight.kept, tight.misses, tight.hits) == (0, 2, 0)


@pytest.mark.slow
def test_kept_states_give_the_full_forwards_loss_and_gradients_on_gemma(gemma_hf: Path) -> None:
    from transformers import AutoModelForCausalLM

    from edge_annotator.train.model import load_tokenizer

    model, first = _top_lora(AutoModelForCausalLM.from_pretrained(gemma_hf, dtype=torch.float32,
                                                                  use_safetensors=True), 4)
    assert supported(model.get_base_model().model) and model.config.sliding_window
    _check(model, load_tokenizer(gemma_hf), first)


@pytest.mark.parametrize("arch", ["qwen3", "llama3"])
def test_kept_states_give_the_full_forwards_loss_and_gradients_on_the_tiny_bases(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    from edge_annotator.train.model import load_tokenizer
    from edge_annotator.train.tiny import tiny_base

    base = tiny_base(arch, tmp_path / arch, tied=arch == "qwen3")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    assert model.config.num_hidden_layers >= 2
    model, first = _top_lora(model, 1)
    assert supported(model.get_base_model().model)
    _check(model, load_tokenizer(base), first)


def test_only_layers_runs_the_layers_it_names_and_restores_the_stack(tmp_path: Path) -> None:
    """Bottom then top equals the whole stack; afterwards the modules are their own again."""
    from transformers import AutoModelForCausalLM

    from edge_annotator.train.tiny import tiny_base

    model = AutoModelForCausalLM.from_pretrained(tiny_base("llama3", tmp_path / "b"), dtype=torch.float32,
                                                 use_safetensors=True)
    inner, L = model.model, model.config.num_hidden_layers
    x = torch.tensor([[5, 17, 42, 9, 300, 7]])
    with torch.no_grad():
        whole = inner(input_ids=x, use_cache=False).last_hidden_state
        with only_layers(inner, range(1), norm=False):
            h = inner(input_ids=x, use_cache=False).last_hidden_state
        with only_layers(inner, range(1, L), norm=True):
            top = inner(inputs_embeds=h, use_cache=False).last_hidden_state
        again = inner(input_ids=x, use_cache=False).last_hidden_state
    torch.testing.assert_close(top, whole, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(h, whole)
    assert torch.equal(again, whole) and all("forward" not in m.__dict__ for m in [*inner.layers, inner.norm])
