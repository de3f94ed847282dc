"""A micro-batch as one token tree: the instruction once, each item once, each criterion a branch.

    batch = build_tree(tok, spec, tries, units, opts)      # units: items with their targets
    with tree_attention(model):
        logp = level_logprobs(model, batch)                 # (queries, levels): the runtime's distribution
    loss = soft_cross_entropy(logp, batch)

Most of an example's tokens are the instruction and rubric (about 200 of 265 for EmoBank), the
same for every item of a micro-batch that shares a template and label order; an item's tokens are
the same for all its criteria. So a micro-batch is packed into one sequence

    [instruction + rubric] [item 1] ... [item B] [cue 1,1] [cue 1,2] ... [cue B,C]

where every token keeps the position it has in its own prompt, and a custom attention function
(registered with transformers' AttentionInterface, so it serves any model that routes attention
through it: Gemma 3, Qwen2/3, Llama) lets each token see exactly the tokens before it in its own
prompt: the instruction sees itself causally, an item the instruction and itself, a cue the
instruction, its item and itself. Every cue's last hidden state is then the one the full prompt
would give (tests/test_tree.py checks loss and gradients against one sequence per prompt), at
about a quarter of the tokens. The cue rows end in the answers' token trie exactly as the runtime
scores them (runtime/annotator.py): one row per branching node, the logits restricted to that
node's children, so the level probabilities are the runtime's and the vocabulary head is
computed for the handful of answer tokens only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_annotator.hf.frozen import FrozenLayers
from edge_annotator.runtime.annotator import AnswerTrie, common_prefix_len, segment_bounds
from edge_annotator.runtime.prompt import RenderOptions, leading_inputs, prompt_segments
from edge_annotator.runtime.spec import TaskSpec

Tokenize = Callable[[str], list[int]]


class Tokens:
    """A tokenizer's ids for texts, as llama.cpp gives them at run time, computed in batches and kept.

        tok = Tokens(tokenizer)
        tok("one text")                      # -> list[int]
        tok.many(["a", "b", "a"])            # one batched call for the texts not seen before

    A tree needs 1 + C + 1 whole-prompt tokenizations per item (prompts are tokenized whole, so the
    runtime's token boundaries hold); one call per text was about 85% of building a tree. `many`
    sends the texts not yet kept to the tokenizer in one batch (the Rust tokenizer encodes a batch
    in parallel, without the GIL) and keeps up to `capacity` texts' ids as int32 arrays, oldest
    dropped first: a recipe without augmentation renders the same prompts every epoch, and every
    micro-batch of one template shares its instruction. Each call returns fresh lists."""

    def __init__(self, tokenizer: Any, capacity: int = 200_000):
        self.tokenizer, self.capacity = tokenizer, capacity
        self._kept: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, text: str) -> list[int]:
        return self.many([text])[0]

    def many(self, texts: Sequence[str]) -> list[list[int]]:
        new = [t for t in dict.fromkeys(texts) if t not in self._kept]
        self.misses += len(new)
        self.hits += len(texts) - len(new)
        if new:
            for t, i in zip(new, self.tokenizer(new, split_special_tokens=True)["input_ids"]):
                self._kept[t] = np.asarray(i, dtype=np.int32)
        out = [self._kept[t].tolist() for t in texts]
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
        return out


def tokenize_all(tokenize: Tokenize, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of every text: one batched call through a Tokens, else one call per text."""
    return tokenize.many(texts) if isinstance(tokenize, Tokens) else [tokenize(t) for t in texts]


@dataclass
class Unit:
    """One item as it enters a micro-batch: its fields and, per criterion, a target distribution."""

    fields: Mapping[str, Any]
    targets: Sequence[np.ndarray | None]
    """Per criterion (spec order): probabilities over its levels, or None to leave it out."""
    input_order: tuple[int, ...] | None = None
    """This item's order of the spec's input fields (augmentation); None keeps the spec's."""
    drop_prob: float = 0.0
    """Token dropout: each of the item's tokens is replaced by the pad token with this probability,
    drawn from `rng` (augmentation)."""
    rng: np.random.Generator | None = None


@dataclass
class TreeBatch:
    input_ids: torch.Tensor
    """(1, N) the packed tokens."""
    position_ids: torch.Tensor
    """(1, N) each token's position in its own prompt."""
    item_of: torch.Tensor
    """(N - prefix_len,) for each token after the prefix: the unit it belongs to."""
    row_of: torch.Tensor
    """(N - prefix_len,) the scoring row a token belongs to, -1 for an item's own tokens."""
    ends: torch.Tensor
    """(R,) packed index of each scoring row's last token."""
    kids: torch.Tensor
    """(R, K) answer token ids the row's logits are restricted to (padded with 0)."""
    kid_valid: torch.Tensor
    """(R, K)"""
    contrib: torch.Tensor
    """(M, 4): (query, level, row, kid slot): log P(level) of a query sums its rows' log-probs."""
    targets: torch.Tensor
    """(Q, L) target distribution per query (zero beyond a criterion's levels)."""
    queries: list[tuple[int, int]]
    """(unit, criterion) of each query."""
    n_levels: list[int]
    """Levels of each query's criterion."""
    prefix_len: int
    _masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _blocks: dict[int, Blocks] = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def row_tokens(self, r: int) -> list[int]:
        """The full token sequence scoring row r stands for: prefix, its item, the row itself."""
        Lp = self.prefix_len
        rest = self.input_ids[0, Lp:]
        mine = (self.item_of == self.item_of[self.ends[r] - Lp]) & ((self.row_of == -1) | (self.row_of == r))
        return self.input_ids[0, :Lp].tolist() + rest[mine].tolist()

    def masks(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which keys each query sees: (N, Lp) over the prefix and (N - Lp, N - Lp) after it.

        Packed order is prefix, items, rows, so "before me in my own prompt" is: the prefix
        (causally for prefix tokens, all of it for the rest), then my item's tokens up to me, and
        for a row token its item's tokens and its own row's up to it."""
        key = window or 0
        got = self._masks.get(key)
        if got is None:
            Lp, pos = self.prefix_len, self.position_ids[0]
            n = torch.arange(pos.shape[0])
            m_a = (n[:, None] >= Lp) | (n[:, None] >= n[None, :Lp])
            i, r = self.item_of, self.row_of
            j = torch.arange(i.shape[0])
            same_item = i[:, None] == i[None, :]
            m_b = same_item & ((r[None, :] == -1) | (r[None, :] == r[:, None])) & (j[None] <= j[:, None])
            if window:
                m_a &= (pos[:, None] - pos[None, :Lp]) < window
                m_b &= (pos[Lp:, None] - pos[None, Lp:]) < window
            got = self._masks[key] = (m_a, m_b)
        return got

    def blocks(self, window: int | None) -> Blocks:
        """The block layout (Blocks) and its masks, the same visibility as `masks` gives."""
        key = window or 0
        got = self._blocks.get(key)
        if got is None:
            Lp, pos = self.prefix_len, self.position_ids[0]
            i, r = self.item_of, self.row_of
            B = int(i.max()) + 1 if i.numel() else 0
            counts = torch.bincount(i, minlength=B)
            n = int(counts.max()) if B else 0
            # tokens of one item are increasing in packed order; stable sort keeps that order
            order = torch.sort(i, stable=True).indices
            start = torch.cumsum(counts, 0) - counts
            slot = torch.arange(i.numel()) - start[i[order]]  # position inside its block
            idx = torch.zeros(B, n, dtype=torch.long)
            valid = torch.zeros(B, n, dtype=torch.bool)
            idx[i[order], slot] = order
            valid[i[order], slot] = True
            inv = torch.empty_like(order)
            inv[order] = i[order] * n + slot
            rb = torch.where(valid, r[idx], -2)  # row of each slot; -1 item token, -2 padding
            j = torch.arange(n)
            own = (valid[:, :, None] & valid[:, None, :] & (j[None, None, :] <= j[None, :, None])
                   & ((rb[:, None, :] == -1) | (rb[:, None, :] == rb[:, :, None])))
            pre = None
            if window:
                pb = pos[Lp:][idx]  # (B, n) positions of the slots
                own &= (pb[:, :, None] - pb[:, None, :]) < window
                pre = (pb[:, :, None] - pos[None, None, :Lp]) < window
                pre[..., 0] |= ~valid  # padding keeps one key, so its softmax (never read) stays finite
            got = self._blocks[key] = Blocks(idx, inv, own, pre)
        return got


@dataclass
class Blocks:
    """The tokens after the prefix as one padded block per item: the item's own tokens, then its
    rows, in packed order. A token sees only the prefix and its own block, so attention over
    (B, n) blocks costs B * n * (Lp + n), linear in the number of items, where one dense square
    over the packed tokens costs (B * n)^2."""

    idx: torch.Tensor
    """(B, n) index of each block slot into the tokens after the prefix (0 in padding)."""
    inv: torch.Tensor
    """(N - Lp,) each token's flat slot (b * n + j) in the blocks."""
    own: torch.Tensor
    """(B, n, n) which slots of its block each slot sees (padding sees nothing)."""
    pre: torch.Tensor | None
    """(B, n, Lp) which prefix tokens each slot sees; None: all (no sliding window reaches back)."""


def runs_by_key(keys: Sequence[Any]) -> list[list[int]]:
    """Consecutive indices with equal keys, as lists: the trees a micro-batch is cut into."""
    out: list[list[int]] = []
    for i, k in enumerate(keys):
        if out and keys[out[-1][-1]] == k:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def item_texts(spec: TaskSpec, fields: Mapping[str, Any], opts: RenderOptions) -> tuple[str, str, list[str]]:
    """The texts a tree tokenizes for one item, each whole: the instruction, the head (instruction
    and inputs) and one full prompt per criterion (spec order). Training's length check tokenizes
    the same texts, so the ids it keeps are the ones the trees then ask for."""
    segs = [prompt_segments(spec, fields, c, opts) for c in spec.criteria]
    return segs[0][0], segs[0][0] + segs[0][1], [a + b + cue for a, b, cue in segs]


def build_tree(tokenize: Tokenize, spec: TaskSpec, tries: Mapping[str, AnswerTrie], units: Sequence[Unit],
               opts: RenderOptions, pad_id: int) -> TreeBatch:
    """Pack units (all rendered with the instruction `opts`: one template and label order) into one tree.

    Token boundaries follow the runtime's rule (runtime/annotator.py: Annotator.plan): each prompt
    is tokenized whole, and a segment ends where its own tokens stop being a prefix of the
    prompt's, so the packed tokens of every prompt are exactly its own tokenization."""
    instr_text = prompt_segments(spec, units[0].fields, spec.criteria[0], opts)[0]
    texts = [instr_text]  # then per unit: its head (instruction + inputs) and one prompt per criterion
    for u in units:
        own_instr, head_text, prompts = item_texts(spec, u.fields,
                                                   RenderOptions(opts.template, u.input_order, opts.level_orders))
        if own_instr != instr_text:
            raise ValueError("units of one tree must share the instruction (template and label order)")
        texts.append(head_text)
        texts.extend(prompts)
    ids_of = tokenize_all(tokenize, texts)
    instr = ids_of[0]
    stems = [tries[c.name].branches[0][0] for c in spec.criteria]  # each answer trie's root
    plans = []
    C = len(spec.criteria)
    for k in range(len(units)):
        head, fulls = ids_of[1 + k * (C + 1)], ids_of[2 + k * (C + 1): 1 + (k + 1) * (C + 1)]
        shared, split = segment_bounds(instr, head, fulls, stems)
        plans.append((fulls, shared, split))
    Lp = min(p[1] for p in plans)
    keys = {leading_inputs(spec, u.fields) for u in units}
    if len(keys) == 1 and any(keys.pop()) and not any(u.drop_prob > 0 for u in units):
        # items that share their leading inputs (a context with several responses) share those
        # tokens too: the prefix runs on to where their prompts part, each item keeping a token
        first = plans[0][0][0]
        common = min(common_prefix_len(p[0][0], first) for p in plans)
        Lp = max(Lp, min(common, min(p[2] for p in plans) - 1))
    prefix = plans[0][0][0][:Lp]

    ids: list[int] = list(prefix)
    pos: list[int] = list(range(Lp))
    item_of: list[int] = []
    row_of: list[int] = []
    item_end: list[int] = []  # position after each item's last token
    for u, (fulls, shared, split) in zip(units, plans):
        toks = list(fulls[0][Lp:split])
        if u.drop_prob > 0 and u.rng is not None:
            lo = shared - Lp  # the item's own tokens, not an instruction tail that merged into it
            for dropped in np.nonzero(u.rng.random(len(toks) - lo) < u.drop_prob)[0]:
                toks[lo + int(dropped)] = pad_id
        ids.extend(toks)
        pos.extend(range(Lp, Lp + len(toks)))
        item_of.extend([len(item_end)] * len(toks))
        row_of.extend([-1] * len(toks))
        item_end.append(Lp + len(toks))

    ends: list[int] = []
    kids: list[tuple[int, ...]] = []
    contrib: list[tuple[int, int, int, int]] = []
    targets: list[np.ndarray] = []
    queries: list[tuple[int, int]] = []
    n_levels: list[int] = []
    for ui, (u, (fulls, _, split), at) in enumerate(zip(units, plans, item_end)):
        for ci, c in enumerate(spec.criteria):
            t = u.targets[ci] if ci < len(u.targets) else None
            if t is None:
                continue
            trie = tries[c.name]
            cue = list(fulls[ci][split:])
            q = len(queries)
            queries.append((ui, ci))
            n_levels.append(len(c.scale))
            targets.append(np.asarray(t, dtype=np.float64))
            node_row: dict[tuple[int, ...], int] = {}
            for prefix_toks, children in trie.branches:
                toks = cue + list(prefix_toks)
                ids.extend(toks)
                pos.extend(range(at, at + len(toks)))
                item_of.extend([ui] * len(toks))
                row_of.extend([len(ends)] * len(toks))
                node_row[prefix_toks] = len(ends)
                ends.append(len(ids) - 1)
                kids.append(children)
            for lv, path in enumerate(trie.paths):
                for d in range(len(path)):
                    r = node_row.get(path[:d])
                    if r is not None:
                        contrib.append((q, lv, r, kids[r].index(path[d])))
    if not queries:
        raise ValueError("no unit has a target: nothing to score")
    K = max(len(k) for k in kids)
    kid_t = torch.zeros(len(kids), K, dtype=torch.long)
    kid_valid = torch.zeros(len(kids), K, dtype=torch.bool)
    for r, ks in enumerate(kids):
        kid_t[r, : len(ks)] = torch.tensor(ks)
        kid_valid[r, : len(ks)] = True
    L = max(n_levels)
    tgt = torch.zeros(len(queries), L, dtype=torch.float32)
    for q, t in enumerate(targets):
        tgt[q, : len(t)] = torch.from_numpy(t.astype(np.float32))
    return TreeBatch(torch.tensor([ids]), torch.tensor([pos]), torch.tensor(item_of, dtype=torch.long),
                     torch.tensor(row_of, dtype=torch.long), torch.tensor(ends), kid_t, kid_valid,
                     torch.tensor(contrib, dtype=torch.long), tgt, queries, n_levels, Lp)


# --- attention over the tree ------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[TreeBatch | None] = contextvars.ContextVar("edge_annotator_tree", default=None)
_DENSE: contextvars.ContextVar[bool] = contextvars.ContextVar("edge_annotator_tree_dense", default=False)
IMPL = "edge_annotator_tree"


def _tree_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (1, H, N, d), key/value (1, KVH, N, d) -> (1, N, H, d).

    The prefix attends to itself causally. Every token after it sees the prefix and its own item's
    block (Blocks): the scores of both go through one softmax, so each token gets exactly the
    attention of its own full prompt. The blocks go through torch's fused attention (SDPA, a
    boolean mask: 8-12% faster than scores by hand on 2 cores, and the probabilities are never
    stored for the backward pass); a softcapped score has no fused form and goes by hand."""
    batch = _CURRENT.get()
    if batch is None:
        raise RuntimeError("tree attention called outside `with tree_attention(model)` and a tree forward")
    if _DENSE.get():
        return _dense_tree_attention(module, query, key, value, batch, scaling, dropout, sliding_window, softcap)
    q, k, v, scale = _grouped(query, key, value, scaling)
    G, R, N, d = q.shape
    H, Lp = G * R, batch.prefix_len
    blk = batch.blocks(sliding_window)
    dev = q.device
    idx, own = blk.idx.to(dev), blk.own.to(dev)
    B, n = idx.shape
    kp, vp = k[..., :Lp, :], v[..., :Lp, :]  # (G, 1, Lp, d)
    # the prefix: causal over itself
    s_pp = (q[..., :Lp, :] @ kp.transpose(-1, -2)) * scale  # (G, R, Lp, Lp)
    if softcap:
        s_pp = torch.tanh(s_pp / softcap) * softcap
    causal = torch.ones(Lp, Lp, dtype=torch.bool, device=dev).tril()
    if sliding_window:
        pp = batch.position_ids[0, :Lp].to(dev)
        causal &= (pp[:, None] - pp[None, :]) < sliding_window
    s_pp = s_pp.masked_fill(~causal, float("-inf"))
    # softmax in fp32 whatever the compute dtype (as transformers' eager attention does for bf16)
    p_pp = F.dropout(torch.softmax(s_pp, dim=-1, dtype=torch.float32).to(q.dtype), dropout, module.training)
    # the rest, one block per item: (G, R, B, n, d) queries against the prefix and their own block
    qb = q[..., Lp:, :][..., idx, :]
    kb, vb = k[..., Lp:, :][..., idx, :], v[..., Lp:, :][..., idx, :]  # (G, 1, B, n, d)
    pre = blk.pre.to(dev) if blk.pre is not None else torch.ones(B, n, Lp, dtype=torch.bool, device=dev)
    if softcap:  # a capped score has no fused kernel: scores and softmax by hand
        s_pre = (qb @ kp.transpose(-1, -2)[:, :, None]) * scale  # (G, R, B, n, Lp)
        s_own = (qb @ kb.transpose(-1, -2)) * scale  # (G, R, B, n, n)
        s_pre, s_own = torch.tanh(s_pre / softcap) * softcap, torch.tanh(s_own / softcap) * softcap
        s = torch.cat([s_pre.masked_fill(~pre, float("-inf")), s_own.masked_fill(~own, float("-inf"))], dim=-1)
        p = F.dropout(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), dropout, module.training)
        out_b = p[..., :Lp] @ vp[:, :, None] + p[..., Lp:] @ vb  # (G, R, B, n, d)
    else:  # one fused attention per (item, key head) over [prefix keys, its own block's keys]
        keys = torch.cat([kp[:, :, None].expand(G, 1, B, Lp, d), kb], dim=-2)  # (G, 1, B, Lp + n, d)
        vals = torch.cat([vp[:, :, None].expand(G, 1, B, Lp, d), vb], dim=-2)
        qs = qb.permute(2, 0, 1, 3, 4).reshape(B * G, R, n, d)
        keys = keys.permute(2, 0, 1, 3, 4).reshape(B * G, 1, Lp + n, d).expand(B * G, R, Lp + n, d)
        vals = vals.permute(2, 0, 1, 3, 4).reshape(B * G, 1, Lp + n, d).expand(B * G, R, Lp + n, d)
        mask = torch.cat([pre, own], dim=-1).repeat_interleave(G, dim=0)[:, None]  # (B * G, 1, n, Lp + n)
        o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale,
                                           dropout_p=dropout if module.training else 0.0)
        out_b = o.reshape(B, G, R, n, d).permute(1, 2, 0, 3, 4)  # (G, R, B, n, d)
    out_rest = out_b.reshape(G, R, B * n, d)[..., blk.inv.to(dev), :]  # back to packed order
    out = torch.cat([p_pp @ vp, out_rest], dim=-2)
    return out.reshape(H, N, d).transpose(0, 1)[None], None


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(1, H, N, d) queries as (G, H / G, N, d), one group per key head, and (1, G, N, d) keys and
    values as (G, 1, N, d): grouped query heads broadcast against their key head without copies."""
    _, H, N, d = query.shape
    G = key.shape[1]
    return (query[0].reshape(G, H // G, N, d), key[0][:, None], value[0][:, None],
            scaling if scaling is not None else d ** -0.5)


def _dense_tree_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          batch: TreeBatch, scaling: float | None, dropout: float, sliding_window: int | None,
                          softcap: float | None) -> tuple[torch.Tensor, None]:
    """The same attention as two dense parts: every query against the prefix, and the tokens after
    it against each other, masked to the tree. (N - Lp)^2 scores per head: kept to measure the
    blocked form against (`make bench-train`) and to test both."""
    q, k, v, scale = _grouped(query, key, value, scaling)
    G, R, N, d = q.shape
    H, Lp = G * R, batch.prefix_len
    m_a, m_b = (m.to(q.device) for m in batch.masks(sliding_window))
    s_a = (q @ k[..., :Lp, :].transpose(-1, -2)) * scale  # (G, R, N, Lp)
    s_b = (q[..., Lp:, :] @ k[..., Lp:, :].transpose(-1, -2)) * scale  # (G, R, N - Lp, N - Lp)
    if softcap:
        s_a, s_b = torch.tanh(s_a / softcap) * softcap, torch.tanh(s_b / softcap) * softcap
    s_a = s_a.masked_fill(~m_a, float("-inf"))
    s_b = s_b.masked_fill(~m_b, float("-inf"))
    p_pre = torch.softmax(s_a[..., :Lp, :], dim=-1, dtype=torch.float32).to(q.dtype)
    p = torch.softmax(torch.cat([s_a[..., Lp:, :], s_b], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    p_pre, p = F.dropout(p_pre, dropout, module.training), F.dropout(p, dropout, module.training)
    out = torch.cat([p_pre @ v[..., :Lp, :], p[..., :Lp] @ v[..., :Lp, :] + p[..., Lp:] @ v[..., Lp:, :]], dim=-2)
    return out.reshape(H, N, d).transpose(0, 1)[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL, _tree_attention)


@contextlib.contextmanager
def tree_attention(model: Any, dense: bool = False) -> Iterator[None]:
    """Route the model's attention through the tree while inside; restore its own afterwards.
    dense: the (N - Lp)^2 form instead of the per-item blocks (the same numbers, slower)."""
    _register()
    cfg = causal_model(model).config
    old = cfg._attn_implementation
    cfg._attn_implementation = IMPL
    token = _DENSE.set(dense)
    try:
        yield
    finally:
        _DENSE.reset(token)
        cfg._attn_implementation = old


def causal_model(model: Any) -> Any:
    """The causal LM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def restricted_logits(model: Any, hidden: torch.Tensor, kids: torch.Tensor) -> torch.Tensor:
    """Logits of the answer tokens `kids` (R, K) only, from final hidden states (R, H)."""
    causal = causal_model(model)
    w = causal.get_output_embeddings().weight[kids]  # (R, K, H)
    logits = torch.einsum("rh,rkh->rk", hidden.to(w.dtype), w).float()
    cap = getattr(causal.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def level_logprobs_from_rows(row_logits: torch.Tensor, batch: TreeBatch) -> torch.Tensor:
    """(Q, L) log-probability of each level: the sum over its trie path of the restricted log-softmaxes."""
    lp = torch.log_softmax(row_logits.masked_fill(~batch.kid_valid.to(row_logits.device), float("-inf")), dim=-1)
    c = batch.contrib.to(row_logits.device)
    vals = lp[c[:, 2], c[:, 3]]
    Q, L = batch.targets.shape
    flat = torch.zeros(Q * L, dtype=lp.dtype, device=lp.device).index_add(0, c[:, 0] * L + c[:, 1], vals)
    return flat.view(Q, L)


def level_logprobs(model: Any, batch: TreeBatch, frozen: FrozenLayers | None = None) -> torch.Tensor:
    """One forward over the packed tree (inside `tree_attention(model)`); with `frozen`, the layers
    below the adapter come from its kept states where it has them (hf/frozen.py)."""
    causal = causal_model(model)
    dev = next(causal.parameters()).device
    token = _CURRENT.set(batch)
    try:
        if frozen is not None:
            hidden = frozen.forward(causal.model, batch, dev)
        else:
            hidden = causal.model(input_ids=batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev),
                                  use_cache=False).last_hidden_state[0]
    finally:
        _CURRENT.reset(token)
    row_logits = restricted_logits(model, hidden[batch.ends.to(dev)], batch.kids.to(dev))
    return level_logprobs_from_rows(row_logits, batch)


def soft_cross_entropy(logp: torch.Tensor, batch: TreeBatch) -> torch.Tensor:
    """Sum over queries of -sum_l target_l log p_l (the caller divides by the step's query count)."""
    t = batch.targets.to(logp.device)
    return -(t * logp).sum()


# --- the reference: one full sequence per prompt ---------------------------------------------

def unshared_level_logprobs(model: Any, tokenize: Tokenize, spec: TaskSpec, tries: Mapping[str, AnswerTrie],
                            units: Sequence[Unit], opts: RenderOptions, pad_id: int,
                            batch: TreeBatch) -> torch.Tensor:
    """The same (Q, L) log-probabilities with every scoring row rendered on its own
    (runtime/prompt.py: render_prompt, then the trie node's tokens) and run as its own right-padded
    sequence through the model's own attention: the reference the tree must equal (without token
    dropout, which this path does not apply)."""
    from edge_annotator.runtime.prompt import render_prompt

    causal = causal_model(model)
    dev = next(causal.parameters()).device
    seqs: list[list[int]] = []
    for ui, ci in batch.queries:
        u, c = units[ui], spec.criteria[ci]
        prompt = tokenize(render_prompt(spec, u.fields, c, RenderOptions(opts.template, u.input_order,
                                                                          opts.level_orders)))
        for prefix_toks, _ in tries[c.name].branches:
            seqs.append(prompt + list(prefix_toks))
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    m = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
        m[i, : len(s)] = 1
    hidden = causal.model(input_ids=x.to(dev), attention_mask=m.to(dev), use_cache=False).last_hidden_state
    last = torch.tensor([len(s) - 1 for s in seqs], device=dev)
    h = hidden[torch.arange(len(seqs), device=dev), last]
    return level_logprobs_from_rows(restricted_logits(model, h, batch.kids.to(dev)), batch)
