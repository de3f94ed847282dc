"""The frozen layers below the adapter, computed once per token: passes that cost the adapted layers only.

    frozen = FrozenLayers(first=14)                  # the adapter trains layers 14.. and nothing below
    with tree_attention(model):
        logp = level_logprobs(model, tree, frozen)   # the same numbers as without `frozen`

When LoRA adapts only the top layers (lora.layers = [m, ..., L-1]) and nothing below them trains
(the embedding frozen), the output of layers 0..m-1 at a token depends on the token ids of its own
prompt up to it, and on nothing else: not on the pass, not on the micro-batch that packs it (the
tree gives every token exactly the attention of its own prompt, hf/tree.py). So a token is named
by its prompt up to it, a node of a trie of token ids, and its state below layer m is kept per
node. A tree with a node not yet kept runs the frozen layers once, without gradients (nothing
there trains, so the backward pass stops at layer m anyway), and keeps every node's state; a tree
whose nodes are all kept runs layers m..L-1 alone, from the kept states. The top layers get the
very inputs they would get from the full forward, so loss and gradients are the full forward's
(tests/test_frozen.py).

What it buys, measured in `make bench-train` (docs/benchmarks.md): the first pass over the items
costs the frozen layers' forward and the top layers' forward and backward; every later pass the
top layers' alone. Items whose tokens change from pass to pass (token dropout) find nothing kept
and only save the backward through the frozen layers.

Memory: one hidden state per distinct token node, in the model's dtype (300 items of 250 tokens
on Gemma 3 270M: about 0.2 GB in fp32). Past `max_bytes` no new node is kept: trees that need one
run the frozen layers again, without gradients, which is still the cheaper half.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# the decoder stacks whose forward takes the embeddings as they are (no scaling after
# `embed_tokens`) and calls every layer with the hidden states first: what skipping layers needs
ARCHS = ("Gemma3TextModel", "Qwen3Model", "Qwen2Model", "LlamaModel")


class FrozenLayers:
    """Per token node, the output of decoder layers 0..first-1; see the module docstring."""

    def __init__(self, first: int, max_bytes: int = 4 << 30):
        if first < 1:
            raise ValueError("FrozenLayers needs at least one frozen layer below the adapted ones")
        self.first, self.max_bytes = first, max_bytes
        self._node: dict[tuple[int, int], int] = {}  # (parent node or -1, token id) -> node
        self._states: torch.Tensor | None = None  # (capacity, hidden): row n is node n's state
        self.hits = self.misses = 0  # trees run from kept states / trees that ran the frozen layers

    @property
    def kept(self) -> int:
        """Nodes with a state: every node is kept by the forward that made it."""
        return len(self._node)

    @property
    def bytes(self) -> int:
        return 0 if self._states is None else self.kept * self._states.shape[1] * self._states.element_size()

    def nodes(self, tree: Any, row_bytes: int) -> tuple[torch.Tensor, bool]:
        """Each packed token's node (-2 where the memory cap keeps none), and whether the tree
        needs the frozen layers run (a new node, or one that cannot be kept)."""
        ids = tree.input_ids[0].tolist()
        Lp = tree.prefix_len
        item_of, row_of = tree.item_of.tolist(), tree.row_of.tolist()
        out = [-2] * len(ids)
        new = False
        room = (self.max_bytes // max(row_bytes, 1)) - self.kept

        def node(parent: int, tok: int) -> int:
            nonlocal new, room
            if parent == -2:  # above a node that could not be kept: not kept either
                return -2
            key = (parent, tok)
            got = self._node.get(key)
            if got is None:
                if room <= 0:
                    return -2
                got = self._node[key] = len(self._node)
                room -= 1
                new = True
            return got

        parent = -1
        for j in range(Lp):
            parent = out[j] = node(parent, ids[j])
        after_prefix = parent
        last_item: dict[int, int] = {}
        last_row: dict[int, int] = {}
        for k in range(len(ids) - Lp):
            j, u, r = Lp + k, item_of[k], row_of[k]
            if r == -1:
                p = last_item.get(u, after_prefix)
                out[j] = last_item[u] = node(p, ids[j])
            else:
                p = last_row.get(r, last_item.get(u, after_prefix))
                out[j] = last_row[r] = node(p, ids[j])
        nodes = torch.tensor(out, dtype=torch.long)
        return nodes, new or bool((nodes < 0).any())

    def forward(self, inner: Any, tree: Any, device: torch.device) -> torch.Tensor:
        """(N, hidden) final hidden states of the tree (after the final norm), as `inner(...)` gives them."""
        pos = tree.position_ids.to(device)
        first = self.first
        hidden_size = inner.config.hidden_size
        dtype = inner.embed_tokens.weight.dtype
        nodes, fresh = self.nodes(tree, hidden_size * torch.finfo(dtype).bits // 8)
        if fresh:
            self.misses += 1
            with torch.no_grad(), only_layers(inner, range(first), norm=False):
                h = inner(input_ids=tree.input_ids.to(device), position_ids=pos, use_cache=False).last_hidden_state[0]
            keep = nodes >= 0
            if keep.any():
                self._keep(nodes[keep].to(device), h[keep.to(device)])
        else:
            self.hits += 1
            assert self._states is not None
            h = self._states[nodes.to(device)]
        with only_layers(inner, range(first, inner.config.num_hidden_layers), norm=True):
            return inner(inputs_embeds=h[None], position_ids=pos, use_cache=False).last_hidden_state[0]

    def _keep(self, nodes: torch.Tensor, h: torch.Tensor) -> None:
        need = len(self._node)
        if self._states is None or self._states.shape[0] < need:
            cap = max(need, 2 * (0 if self._states is None else self._states.shape[0]), 1024)
            grown = torch.empty(cap, h.shape[1], dtype=h.dtype, device=h.device)
            if self._states is not None:
                grown[: self._states.shape[0]] = self._states
            self._states = grown
        self._states[nodes] = h.detach()


def supported(inner: Any) -> bool:
    """Whether this decoder stack can run a part of its layers (ARCHS)."""
    return type(inner).__name__ in ARCHS


def _through(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def only_layers(inner: Any, layers: range, norm: bool) -> Iterator[None]:
    """Inside, the decoder stack runs only `layers` (the others hand their input on) and the final
    norm only if `norm`: `inner(...).last_hidden_state` is then the output of the last of them."""
    skipped = [m for i, m in enumerate(inner.layers) if i not in layers] + ([] if norm else [inner.norm])
    saved = [m.__dict__.get("forward") for m in skipped]  # a hook's own forward (accelerate) comes back
    for m in skipped:
        m.forward = _through
    try:
        yield
    finally:
        for m, f in zip(skipped, saved):
            if f is None:
                del m.forward
            else:
                m.forward = f
