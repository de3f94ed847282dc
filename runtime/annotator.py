"""Scoring items: the label and the probability of every allowed label, from restricted logits.

The model never writes free text. For each criterion the allowed answers are tokenized after the
prompt and arranged in a token trie; at every node where answers part ways, the next-token
logits are restricted to the children and normalised. An answer's probability is the product
along its path, so the probabilities of the allowed labels sum to one and no invalid label can
come out. Single-token answers (the common case) need one evaluation per item and criterion.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import ContextOverflow, LlamaEngine, ModelError
from .linear_head import Head, Tap
from .prompt import ANSWER_SEP, prompt_segments, render_prompt
from .records import PROB_DIGITS, Score, result_record
from .spec import Criterion, SpecError, TaskSpec
from .trust import accepts, confidence, interval, label_set

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnswerTrie:
    criterion: Criterion
    paths: tuple[tuple[int, ...], ...]
    """Token ids of each level's answer, in the spec's level order."""
    branches: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    """(prefix, distinct next tokens) for every node where answers diverge, in depth-first order."""

    @property
    def evaluations(self) -> int:
        return len(self.branches)


Tokenize = Callable[[str], list[int]]


def answer_suffix(tokenize: Tokenize, prompt: str, answer: str) -> list[int] | None:
    """Tokens that `answer` adds after `prompt`, or None if joining them re-tokenizes the prompt."""
    base = tokenize(prompt)
    full = tokenize(prompt + ANSWER_SEP + answer)
    if full[: len(base)] != base:
        return None
    return full[len(base):]


def build_trie(tokenize: Tokenize, spec: TaskSpec, c: Criterion,
               piece: Callable[[int], str] = str) -> AnswerTrie:
    """The criterion's answers as a token trie under `tokenize` (llama.cpp's or an HF tokenizer's)."""
    # Any item will do: the answers follow the fixed cue line, which ends every prompt.
    probe = render_prompt(spec, {f.name: "example" for f in spec.inputs}, c)
    problems = []
    paths = []
    for lv in c.scale:
        toks = answer_suffix(tokenize, probe, lv.answer)
        if toks is None:
            problems.append(f"answer {lv.answer!r} merges with the answer cue when tokenized; change answer_cue")
        elif not toks:
            problems.append(f"answer {lv.answer!r} tokenizes to nothing")
        else:
            paths.append(tuple(toks))
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            short, long_ = sorted((a, b), key=len)
            if long_[: len(short)] == short:
                pa = [piece(t) for t in short]
                problems.append(f"answers {_answer_of(c, paths, a)!r} and {_answer_of(c, paths, b)!r} do not "
                                f"tokenize to distinct tokens (one is {pa} followed by more); make each "
                                f"answer distinct in its first token, e.g. a letter or a number per level")
    if problems:
        raise SpecError(f"spec '{spec.name}', criterion '{c.name}'", problems)
    nodes: dict[tuple[int, ...], list[int]] = {}
    for path in paths:
        for d in range(len(path)):
            kids = nodes.setdefault(path[:d], [])
            if path[d] not in kids:
                kids.append(path[d])
    branches = tuple((prefix, tuple(kids)) for prefix, kids in sorted(nodes.items()) if len(kids) > 1)
    return AnswerTrie(c, tuple(paths), branches)


def _answer_of(c: Criterion, paths: list[tuple[int, ...]], p: tuple[int, ...]) -> str:
    return c.scale[paths.index(p)].answer


def level_probs(trie: AnswerTrie, cond: Callable[[tuple[int, ...]], dict[int, float] | None]) -> list[float]:
    """Probability of each level: the product of the restricted conditionals along its path."""
    probs = []
    for path in trie.paths:
        p = 1.0
        for d in range(len(path)):
            node = cond(path[:d])
            if node is not None:
                p *= node[path[d]]
        probs.append(p)
    return probs


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two token lists share: where a prompt's segment boundary falls."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def segment_bounds(instr: Sequence[int], head: Sequence[int], fulls: Sequence[Sequence[int]],
                   stems: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Where an item's prompts (one per criterion, each tokenized whole: `fulls`) stop sharing the
    instruction's tokens and the instruction-plus-inputs' tokens (`head`): (shared, split).

    Boundaries are where each text's own tokens are a prefix of the prompt's (a token that merges
    across a boundary moves it back), a function of the text alone. Every cue, with its
    criterion's answer stem, keeps at least one token of its own. The runtime (Annotator.plan)
    and training's token trees (hf/tree.py) both cut prompts here."""
    shared = min(common_prefix_len(f, instr) for f in fulls)
    split = min(common_prefix_len(f, head) for f in fulls)
    if any(len(f) == split and not stem for f, stem in zip(fulls, stems)):
        split -= 1
    return shared, split


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def expected_value(c: Criterion, probs: Sequence[float]) -> float | None:
    """The probability-weighted mean of the levels' values (G-Eval's score); None for labels.

    It keeps what the argmax throws away: a model unsure between 3 and 4 scores 3.5, not 3."""
    if c.level == "nominal":
        return None
    return float(sum(float(lv.value) * p for lv, p in zip(c.scale, probs)) / max(sum(probs), 1e-300))


def calibrate(c: Criterion, raw: float) -> float:
    """The spec's monotone map of a raw score onto the human scale: straight lines between its
    (raw, calibrated) knots, flat beyond the ends; the identity where it has none."""
    if not c.calibration:
        return raw
    xs, ys = zip(*c.calibration)
    return float(np.interp(raw, xs, ys))


def criterion_score(c: Criterion, probs: Sequence[float], digits: int | None = None,
                    raw: float | None = None) -> Score:
    """One criterion's Score from its levels' probabilities (spec order): the most probable level
    (ties to the first), the probabilities, and for rating scales the score (RAW where a ridge head
    predicts it, else the probability-weighted mean), calibrated where the spec says so (raw_score
    then keeps the value before it)."""
    if not all(math.isfinite(q) for q in probs):
        raise ModelError(f"the model gave {c.name} non-finite probabilities ({', '.join(map(str, probs))}): its "
                         f"weights are damaged or it diverged; export or copy the file again")
    best = int(np.argmax(probs))
    raw = expected_value(c, probs) if raw is None else raw
    score = calibrate(c, raw) if raw is not None else None
    p: dict[int | float | str, float] = {lv.value: (round(q, digits) if digits is not None else q)
                                         for lv, q in zip(c.scale, probs)}
    accept, span, members = None, None, None
    if c.trust:  # from the values as the record writes them, as `trust` read them when it fitted the rule
        written = round(score, PROB_DIGITS) if score is not None else None
        shown = {str(k): q for k, q in p.items()}
        conf = confidence(c, float(c.trust["tolerance"]), c.scale[best].value, written, shown)
        accept = accepts(c.trust, conf)
        if "set_method" in c.trust:
            members = label_set(c, c.trust, c.scale[best].value, shown)
        elif "coverage" in c.trust and written is not None:
            span = interval(c, c.trust, written, shown)
    return Score(c.scale[best].value, p, score, raw if c.calibration and raw is not None else None, accept, span,
                 members)


def head_score(c: Criterion, head: Head, state: Callable[[Tap], np.ndarray]) -> Score:
    """C's Score by its linear HEAD from the state at each of the head's taps (STATE(tap): the
    criterion's row at a cue tap, the item's at the others), as a record writes it."""
    values = [float(v) for v in c.values] if c.is_numeric else []  # what ridge predicts on
    probs, raw = head.apply(values, state)
    return criterion_score(c, probs, PROB_DIGITS, raw)


@dataclass
class _Plan:
    """How one item is decoded: shared instruction | item tokens | one cue per criterion."""

    shared: int  # positions taken from sequence 0 (the instruction)
    item: list[int]  # tokens after the instruction, read by every criterion
    cues: list[list[int]]  # per criterion: the cue's tokens and the answers' common stem
    error: Exception | None = None


_Key = tuple[int, int, tuple[int, ...]]  # (item, criterion, trie prefix)


class _Rows:
    """One decode being assembled: tokens with positions and sequences, and the rows whose logits
    are read (restricted to a trie node's children, softmaxed) or whose hidden state is."""

    def __init__(self) -> None:
        self.toks: list[int] = []
        self.pos: list[int] = []
        self.seqs: list[tuple[int, ...]] = []
        self.outputs: dict[int, np.ndarray] = {}
        self.where: dict[_Key, int] = {}
        self.states: dict[_Key, int] = {}
        self.taps: dict[int, set[int]] = {}  # layer -> rows whose residual stream after it is read

    def add(self, tok: int, pos: int, seqs: tuple[int, ...]) -> None:
        self.toks.append(tok)
        self.pos.append(pos)
        self.seqs.append(seqs)

    def ask(self, key: _Key, kids: Sequence[int]) -> None:
        """The distribution over `kids` after the last token added."""
        self.outputs[len(self.toks) - 1] = np.asarray(kids, dtype=np.int64)
        self.where[key] = len(self.toks) - 1

    def ask_hidden(self, key: _Key) -> None:
        """The final hidden state after the last token added (what a linear head reads)."""
        self.states[key] = len(self.toks) - 1

    def tap(self, layer: int, rows: Sequence[int]) -> None:
        self.taps.setdefault(layer, set()).update(rows)

    def run(self, eng: LlamaEngine) -> tuple[dict[_Key, dict[int, float]], dict[_Key, np.ndarray],
                                             dict[tuple[int, int], np.ndarray]]:
        got, tapped = eng.decode_tree(self.toks, self.pos, self.seqs, self.outputs, self.states.values(),
                                      self.taps) if self.toks else ({}, {})
        return ({key: dict(zip(self.outputs[row].tolist(), _softmax(got[row]).tolist()))
                 for key, row in self.where.items()}, {key: got[row] for key, row in self.states.items()}, tapped)


def check_context(tokenize: Callable[[str], list[int]], spec: TaskSpec, n_ctx: int) -> None:
    """Raise ModelError when SPEC's prompt with every field empty (the instruction, the field names,
    a cue and an answer) does not fit in N_CTX tokens: every item would fail, so the job should not
    start (`--ctx` too small for the task)."""
    empty = {name: "" for name in spec.input_names}
    need = max(len(tokenize(render_prompt(spec, empty, c))) for c in spec.criteria) + 8
    if need > n_ctx:
        raise ModelError(f"--ctx {n_ctx} cannot hold task '{spec.name}': its prompt with every field empty "
                         f"needs {need} tokens; give --ctx of at least {need} plus the longest item's tokens "
                         f"(the default is 2048)")


class Annotator:
    """A spec bound to a loaded model. `score(fields)` -> {criterion: Score}.

    Decoding schedule, the same for every item whatever ran before (llama.cpp's logits depend on
    how tokens are batched, so a fixed schedule is what makes output reproducible):

    1. the shared instruction, once per job, in sequence 0;
    2. per item, one decode of a token tree: the item's tokens, visible to one sequence per
       criterion, then each criterion's cue in its own sequence, logits at each cue's end;
    3. where answers span several tokens and diverge below their common stem, one more decode
       per trie level.

    With `batch=N`, N items share the decode of step 2 (faster, bigger matmuls; the logits then
    differ in the last bits from batch=1, see README).
    """

    def __init__(self, engine: LlamaEngine, spec: TaskSpec, batch: int = 1):
        self.engine = engine
        self.spec = spec
        self.batch = batch
        self.tries = {c.name: build_trie(engine.tokenize, spec, c, engine.piece) for c in spec.criteria}
        self._deep = [len(self.tries[c.name].branches) - 1 for c in spec.criteria]  # branch nodes below the stem
        self.heads = {c.name: Head.from_dict(c.head, len(c.scale)) for c in spec.criteria if c.head}
        for name, h in self.heads.items():
            if h.dim != engine.n_embd or max(t.layer for t in h.taps) >= engine.n_layer - 1:
                raise ModelError(f"{engine.path}: criterion {name}'s head reads {h.dim} numbers at "
                                 f"{', '.join(t.name for t in h.taps)}; this "
                                 f"model's states have {engine.n_embd} numbers and its layers run to "
                                 f"{engine.n_layer - 2}: the head was fitted on another model")
        self._instr_tokens: dict[str, list[int]] = {}
        check_context(engine.tokenize, spec, engine.n_ctx)
        # sequence 0 + per item: one per criterion + one per deeper trie node
        per_item = len(spec.criteria) + sum(self._deep)
        engine.reserve(1 + batch * per_item, engine.n_ctx + (batch - 1) * 512)

    def _stem(self, c: Criterion) -> list[int]:
        trie = self.tries[c.name]
        return list(trie.branches[0][0])

    def plan(self, fields: Mapping[str, Any]) -> tuple[list[int], _Plan]:
        """The instruction tokens and this item's plan; raises ContextOverflow if it cannot fit."""
        eng = self.engine
        segs = [prompt_segments(self.spec, fields, c) for c in self.spec.criteria]
        instr_text, inputs_text = segs[0][0], segs[0][1]
        instr = self._instr_tokens.get(instr_text)
        if instr is None:
            self._instr_tokens = {instr_text: eng.tokenize(instr_text)}
            instr = self._instr_tokens[instr_text]
        fulls = [eng.tokenize(a + b + cue) for a, b, cue in segs]
        head = eng.tokenize(instr_text + inputs_text)
        stems = [self._stem(c) for c in self.spec.criteria]
        shared, split = segment_bounds(instr, head, fulls, stems)
        cues = [f[split:] + stem for f, stem in zip(fulls, stems)]
        longest = split + max(len(cue) + max(len(p) for p in self.tries[c.name].paths)
                              for cue, c in zip(cues, self.spec.criteria))
        plan = _Plan(shared, fulls[0][shared:split], cues)
        if longest > eng.n_ctx:
            plan.error = ContextOverflow(longest, eng.n_ctx)
        return instr, plan

    def score_many(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Score] | Exception]:
        """Scores of each item, or the exception (ContextOverflow) that kept it from being scored."""
        out: list[dict[str, Score] | Exception] = []
        for start in range(0, len(items), self.batch):
            out.extend(self._score_group(items[start:start + self.batch]))
        return out

    def features(self, items: Sequence[Mapping[str, Any]], taps: Sequence[Tap]
                 ) -> list[dict[Tap, np.ndarray] | Exception]:
        """Each item's states at TAPS (float32; criteria x n_embd at a cue, n_embd at the item), decoded
        as scoring decodes: what a linear head reads (export/heads.py fits one on them)."""
        out: list[dict[Tap, np.ndarray] | Exception] = []
        for start in range(0, len(items), self.batch):
            out.extend(self._score_group(items[start:start + self.batch], taps=tuple(taps)))
        return out

    def _score_group(self, items: Sequence[Mapping[str, Any]], taps: tuple[Tap, ...] | None = None) -> list[Any]:
        """Each item's scores, or with TAPS its states there (features)."""
        planned = [self.plan(f) for f in items]
        if not planned:
            return []
        self.engine.set_prefix(planned[0][0])
        plans = [p for _, p in planned]
        live = [j for j, p in enumerate(plans) if p.error is None]
        used: list[int] = []
        wanted = taps if taps is not None else tuple(sorted({t for h in self.heads.values() for t in h.taps}))
        cond, states = self._decode_cues(plans, live, used, wanted, logits=taps is None)
        if taps is None and any(d for d, c in zip(self._deep, self.spec.criteria) if c.name not in self.heads):
            cond.update(self._decode_deeper(plans, live, used))  # answers that diverge below their stem
        self.engine.drop(used)
        if taps is not None:
            return [p.error if p.error is not None else {t: states[(j, t)] for t in taps} for j, p in enumerate(plans)]
        return [p.error if p.error is not None else self._scores(j, cond, states) for j, p in enumerate(plans)]

    def _seqs_of(self, j: int) -> int:
        """Item j's first sequence id: then one per criterion, then one per deeper trie node."""
        return 1 + j * (len(self.spec.criteria) + sum(self._deep))

    def _decode_cues(self, plans: list[_Plan], live: list[int], used: list[int], taps: tuple[Tap, ...],
                     logits: bool = True) -> tuple[dict[_Key, dict[int, float]], dict[Any, np.ndarray]]:
        """Step 2: each live item's tokens once, seen by one sequence per criterion, then each cue:
        at its end the answers' logits (LOGITS, criteria without a head), and the states at TAPS,
        keyed (item, tap): criteria x n_embd at a cue, n_embd at the item."""
        eng, batch = self.engine, _Rows()
        item_rows: dict[int, list[int]] = {}
        cue_rows: dict[int, list[int]] = {}
        final = any(t.layer == -1 for t in taps)
        for j in live:
            p, base = plans[j], self._seqs_of(j)
            crit_seqs = tuple(base + c for c in range(len(self.spec.criteria)))
            for sq in crit_seqs:
                eng.copy_prefix(sq, p.shared)
            used.extend(crit_seqs)
            first = len(batch.toks)
            for k, t in enumerate(p.item):
                batch.add(t, p.shared + k, crit_seqs)
            item_rows[j] = list(range(first, len(batch.toks)))
            at = p.shared + len(p.item)
            cue_rows[j] = []
            for c, crit in enumerate(self.spec.criteria):
                for k, t in enumerate(p.cues[c]):
                    batch.add(t, at + k, (crit_seqs[c],))
                cue_rows[j].append(len(batch.toks) - 1)
                if final:
                    batch.ask_hidden((j, c, ()))
                if logits and crit.name not in self.heads:
                    stem, kids = self.tries[crit.name].branches[0]
                    batch.ask((j, c, stem), kids)
            for tp in taps:
                if tp.layer >= 0:
                    batch.tap(tp.layer, cue_rows[j] if tp.at == "cue" else item_rows[j][-1:] if tp.at == "last"
                              else item_rows[j])
        cond, finals, tapped = batch.run(eng)
        states: dict[Any, np.ndarray] = {}
        C = len(self.spec.criteria)
        for j in live:
            for tp in taps:
                if tp.layer == -1:
                    states[(j, tp)] = np.stack([finals[(j, c, ())] for c in range(C)])
                elif tp.at == "cue":
                    states[(j, tp)] = np.stack([tapped[(tp.layer, r)] for r in cue_rows[j]])
                elif tp.at == "last":
                    states[(j, tp)] = tapped[(tp.layer, item_rows[j][-1])]
                else:
                    rows = np.stack([tapped[(tp.layer, r)] for r in item_rows[j]]).astype(np.float64)
                    states[(j, tp)] = rows.mean(axis=0).astype(np.float32)
        return cond, states

    def _decode_deeper(self, plans: list[_Plan], live: list[int], used: list[int]) -> dict[_Key, dict[int, float]]:
        """Step 3: every trie node below a criterion's stem, in a sequence of its own."""
        eng, batch = self.engine, _Rows()
        for j in live:
            p, base = plans[j], self._seqs_of(j)
            extra = base + len(self.spec.criteria)
            at = p.shared + len(p.item)
            for c, crit in enumerate(self.spec.criteria):
                if crit.name in self.heads:
                    continue
                stem = len(self._stem(crit))
                end = at + len(p.cues[c])
                for prefix, kids in self.tries[crit.name].branches[1:]:
                    eng.copy_prefix(extra, end, src=base + c)
                    used.append(extra)
                    for k, t in enumerate(prefix[stem:]):
                        batch.add(t, end + k, (extra,))
                    batch.ask((j, c, prefix), kids)
                    extra += 1
        return batch.run(eng)[0]

    def _scores(self, j: int, cond: dict[_Key, dict[int, float]], states: dict[Any, np.ndarray]) -> dict[str, Score]:
        res = {}
        for c, crit in enumerate(self.spec.criteria):
            head = self.heads.get(crit.name)
            if head is not None:
                res[crit.name] = head_score(crit, head, lambda t: states[(j, t)][c] if t.per_criterion  # noqa: B023
                                            else states[(j, t)])
                continue
            probs = level_probs(self.tries[crit.name], lambda prefix: cond.get((j, c, prefix)))  # noqa: B023
            res[crit.name] = criterion_score(crit, probs, PROB_DIGITS)
        return res

    def score(self, fields: Mapping[str, Any]) -> dict[str, Score]:
        (res,) = self.score_many([fields])
        if isinstance(res, Exception):
            raise res
        return res

    def record(self, item_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        return result_record(item_id, self.score(fields))
