"""From a file of human ratings to a parity-checked annotator and its trust report, in one command.

    annotate-cli fit tasks/support.yaml ratings.csv -o support.gguf --budget 20m

The stages, each leaving its output in the run folder (OUT without .gguf, plus .run/), so that
--resume picks up where a run stopped:

    split      RUN/split/{train,val,test}.jsonl, split.json   by item, seeded (runtime/labels.py)
    recipe     RUN/config.yaml                                 sized from the items and their lengths
    estimate   RUN/fit.json                                    two timed steps: the run's time, cut to --budget
    train      RUN/train/ (checkpoints, log, merged/)          train, merge, calibrate (train/job.py)
    export     RUN/annotator.gguf                              --quant, the spec and every choice embedded
    parity     RUN/parity.json                                 the GGUF against the merged model, validation items
    test       RUN/test-predictions.jsonl, RUN/report/         annotate the held-out test items, agree --report
    trust      RUN/annotator-trust.gguf, then OUT              which labels to accept without review: the
                                                               trust rule fitted on the test items
                                                               (export/trust_rule.py), written into OUT

OUT appears only once parity passes. Every choice (steps, lr, epochs, augmentation, max_length,
the split's sizes, the budget and the estimate) goes into RUN/fit.json and into the GGUF's
provenance.

With route "head" nothing is trained: after the split, one stage replaces recipe to parity,

    heads      RUN/annotator.gguf                              the base GGUF with a linear head per
                                                               criterion, fitted on its own states for
                                                               the train and validation items (5-fold
                                                               cross-validated: export/heads.py)

and the test stage follows. Minutes, where training takes the budget (docs/recipes.md compares them).

With route "auto" both run, the heads first:

    heads      RUN/head.gguf, copied to OUT at once       fitted as above; the validation items are
               RUN/heads-val.jsonl                         also scored by heads fitted on the
                                                           training items alone
    recipe ... parity                                      as with route lora
    route      RUN/lora-val.jsonl, fit.json: route         the fine-tune annotates the validation
                                                           items; the heads replace it where their
                                                           gain in alpha there (the measure
                                                           checkpoints are chosen by) has a 95%
                                                           paired-bootstrap interval above 0;
                                                           OUT becomes the file chosen

then test and trust on that file. The first annotator is ready minutes in, before training. The
fine-tune stays unless the heads are clearly better: a few dozen validation items leave most
differences inside the interval, and the fine-tune's figure is on the items its checkpoint and
calibration were chosen on.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from edge_annotator.runtime.errors import OutputError, UserError
from edge_annotator.runtime.files import atomic_copy, refuse_inputs

log = logging.getLogger(__name__)

STAGES = ("split", "recipe", "estimate", "train", "export", "parity", "test", "trust")
ROUTES = ("lora", "head", "auto")


class FitError(UserError, RuntimeError):
    """A fit that cannot go on; the message says which stage and what to do."""


@dataclass(frozen=True)
class FitOptions:
    base: str = "models/gemma-3-270m-hf"
    """The HF base folder (annotate-cli base gemma3-270m DIR makes Gemma 3 270M's)."""
    budget_s: float = 1200.0
    """Training time to size the recipe for (train, validate, merge; export and the test come after)."""
    test: float = 0.2
    val: float = 0.1
    seed: int = 0
    group: str | None = None
    """Keep items sharing this field's value in one split."""
    quant: str = "Q4_K_M"
    threads: int | None = None
    augment: str = "none"
    """The paper's augmentations by name (train/recipe.py AUGMENTATIONS): none, all (paraphrased
    templates, permuted inputs, token dropout), or templates, permute or dropout alone."""
    select_by: str = "score"
    """Checkpoints chosen by the score's alpha (rating scales) or the label's."""
    qat: bool = False
    """Train on the base GGUF's own grid (train/qat.py): the annotator is then one file, that base
    with the trained codes in its blocks, rather than the base and an adapter beside it."""
    tiny: bool = False
    """A 2-layer model built from scratch with the base folder's tokenizer instead of its weights:
    smoke runs and tests (it learns little)."""
    top_layers: int | None = None
    """LoRA on this many top layers only (None: every layer). The layers below then run once per
    token and are kept (hf/frozen.py): later passes cost the top layers alone, so the budget buys
    several times the passes over long items (docs/benchmarks.md)."""
    route: str = "lora"
    """lora: fine-tune, merge, export, parity (the annotator reads its answer tokens); head: no
    training, a linear head per criterion on the base GGUF's own states (export/heads.py); auto:
    both, and the one that agrees better with the humans on the validation items."""
    trust_target: float | None = 0.1
    """The trust rule's most disagreement among accepted labels (runtime/trust.py); None: no rule."""
    trust_delta: float = 0.1
    """The chance that the rule's promise fails."""


def run_dir(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".gguf") + ".run")


def check_out(spec_path: str | Path, labels: str | Path, out: Path, resume: bool) -> Path:
    """OUT's run folder, once it is clear that the fit loses nothing: OUT is no input, and an
    existing OUT (or run folder) is this run's own, being resumed."""
    run = run_dir(out)
    if run.exists() and any(run.iterdir()) and not resume:
        raise OutputError(f"{run} holds an earlier fit; pass --resume to continue it, or remove it")
    refuse_inputs(out, [spec_path, labels])
    if out.is_dir() or (out.exists() and not (resume and (run / "fit.json").exists())):
        raise OutputError(f"{out} exists and no fit of this run folder ({run}) wrote it: fit never replaces a file "
                          f"it did not write; give another -o, or move the file away")
    return run


def fit(spec_path: str | Path, labels: str | Path, out: str | Path, opts: FitOptions = FitOptions(), *,
        resume: bool = False, stage: Callable[[str, str], None] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every stage; `stage(name, what)` is told as each starts and ends, `progress` gets the
    trainer's records. Returns RUN/fit.json's content."""
    from edge_annotator.runtime.labels import split_labels
    from edge_annotator.runtime.spec import load_spec

    out = Path(out)
    run = check_out(spec_path, labels, out, resume)
    state_f = run / "fit.json"
    run.mkdir(parents=True, exist_ok=True)
    say = stage or (lambda name, what: None)
    spec = load_spec(spec_path)
    state: dict[str, Any] = json.loads(state_f.read_text()) if resume and state_f.exists() else {}
    state.setdefault("options", asdict(opts))
    state.update(spec=str(spec_path), labels=str(labels), output=str(out))

    def save() -> None:
        state_f.write_text(json.dumps(state, indent=2, default=str) + "\n")

    split = run / "split"
    if not (split / "split.json").exists():
        say("split", f"by {opts.group or 'item'}: test {opts.test:.0%}, validation {opts.val:.0%}, seed {opts.seed}")
        state["split"] = split_labels(labels, spec, split, opts.test, opts.val, opts.seed, opts.group)["sizes"]
        save()
    state.setdefault("split", json.loads((split / "split.json").read_text())["sizes"])
    sizes = state["split"]
    if sizes["train"]["items"] < 10 or sizes["val"]["items"] < 5:
        raise FitError(f"{labels}: {sizes['train']['items']} training and {sizes['val']['items']} validation items "
                       f"after the split; a fit needs at least 10 and 5 (label more items, or lower --test)")
    if opts.route in ("head", "auto"):
        head = run / ("head.gguf" if opts.route == "auto" else "annotator.gguf")
        # done once the file, its state and (auto) the validation items' records are all there
        if not head.exists() or "heads" not in state or (opts.route == "auto" and "val" not in state["heads"]):
            _heads(spec, split, run, head, opts, state, say)
            save()
            if opts.route == "auto":
                atomic_copy(head, out)
                say("heads", f"{out}: a first annotator, the heads on the base; training comes next")
        if opts.route == "head":
            atomic_copy(head, out)
            return _tested(out, split, run, spec, opts, state, save, say)

    cfg_f = run / "config.yaml"
    if not cfg_f.exists():
        say("recipe", "sized from the items and their lengths")
        raw = _recipe(spec_path, split, run, opts)
        state["recipe"] = {k: raw[k] for k in ("max_steps", "epochs", "lr", "batch_size", "micro_batch",
                                               "max_length", "eval_every", "augment", "qat")}
        say("estimate", "timing two training steps")
        raw = _estimated(raw, opts, state)
        cfg_f.write_text(yaml.safe_dump(raw, sort_keys=False))
        save()
    cfg = _load(cfg_f)

    merged = Path(cfg.output) / "merged"
    if not (merged / "spec.json").exists():
        est = state["estimate"]
        say("train", f"{cfg.max_steps} steps ({est.get('epochs', 0):.1f} passes over the items), about "
                     f"{est['estimate_s'] / 60:.0f} min")
        t0 = time.perf_counter()
        from .job import train_and_merge

        done = train_and_merge(cfg, resume=resume, progress=progress)
        state["train"] = {"seconds": round(time.perf_counter() - t0, 1), "best_step": done.result.state.best_step,
                          "steps": done.result.steps, "val_alpha": done.result.state.best_alpha,
                          "val_alpha_untrained": done.baseline_alpha, "calibration": done.calibration,
                          "timing": done.timing}
        _provenance_add(merged, {"fit": {k: state.get(k) for k in ("options", "split", "recipe", "estimate")}})
        save()

    gguf = run / "annotator.gguf"
    par_f = run / "parity.json"
    if gguf.exists() and (state.get("export") or {}).get("quant", opts.quant) != opts.quant:
        # --resume --quant Q8_0 after a failed parity: the run's own export at the old type goes,
        # and with it every stage after it (parity, the test report, the trust rule)
        say("export", f"{state['export']['quant']} -> {opts.quant}: exporting again")
        for f in (gguf, gguf.with_name(gguf.name + ".manifest.json"), par_f, run / "agree.json", run / "lora-val.jsonl",
                  run / "test-predictions.jsonl", run / "annotator-trust.gguf"):
            f.unlink(missing_ok=True)
        shutil.rmtree(run / "report", ignore_errors=True)
        for k in ("parity", "route", "test", "trust"):
            state.pop(k, None)
    if not gguf.exists():
        say("export", f"{opts.quant}, the spec and provenance embedded")
        from edge_annotator.export.route import export_annotator

        job = export_annotator(merged, gguf, opts.quant, opts.threads)
        state["export"] = {k: job.info.get(k) for k in ("route", "size_bytes", "bits_per_weight",
                                                        "block_bits_per_weight", "base_file", "seconds", "sha256")}
        state["export"]["quant"] = opts.quant
        save()

    if not par_f.exists() or not json.loads(par_f.read_text()).get("pass"):
        say("parity", "the GGUF against the merged model on the validation items")
        from edge_annotator.export.parity import parity

        rep = parity(merged, gguf, split / "val.jsonl", threads=opts.threads)
        par_f.write_text(json.dumps(rep, indent=2) + "\n")
        state["parity"] = {"pass": rep["pass"], "checks": rep["checks"], "humans": rep["humans"]}
        save()
        if not rep["pass"]:
            failed = ", ".join(k for k, v in rep["checks"].items() if not v)
            now = f"{out} holds the heads' annotator" if opts.route == "auto" else f"{out} was not written"
            raise FitError(f"parity failed ({failed}; {par_f}): {now}. Export at a wider type "
                           f"(--quant Q8_0) and continue with --resume")
    if opts.route == "auto" and _route(state, run, spec, opts, save, say) == "head":
        atomic_copy(run / "head.gguf", out)
        out.with_name(out.name + ".manifest.json").unlink(missing_ok=True)  # a fine-tune's export, if one won before
        return _tested(out, split, run, spec, opts, state, save, say)
    atomic_copy(gguf, out)
    atomic_copy(gguf.with_name(gguf.name + ".manifest.json"), out.with_name(out.name + ".manifest.json"))
    exported = state.get("export") or {}
    if exported.get("route") == "adapter":  # the annotator is OUT and its base beside it
        from edge_annotator.export.route import place_base

        place_base(Path(exported["base_file"]), out)

    return _tested(out, split, run, spec, opts, state, save, say)


def _tested(out: Path, split: Path, run: Path, spec: Any, opts: FitOptions, state: dict[str, Any],
            save: Callable[[], None], say: Callable[[str, str], None]) -> dict[str, Any]:
    """The test stage: OUT annotates the held-out test items, then the agreement report."""
    n = state["split"]["test"]["items"]
    if n and not (run / "report" / "report.json").exists():
        say("test", f"annotating {n} held-out test items, then the agreement report")
        state["test"] = _test(out, split / "test.jsonl", run / "test-predictions.jsonl", run / "report", spec, opts,
                              _training(state, opts))
        save()
    return _trusted(out, split, run, opts, state, save, say)


def _trusted(out: Path, split: Path, run: Path, opts: FitOptions, state: dict[str, Any],
             save: Callable[[], None], say: Callable[[str, str], None]) -> dict[str, Any]:
    """The trust stage: the rule fitted on the test items' predictions (items the annotator neither
    learnt from nor was chosen on) goes into the annotator, and OUT becomes that file. Its promise
    is about items like those; the agreement report above is unchanged (the labels are the same)."""
    n = state["split"]["test"]["items"]
    if not n or opts.trust_target is None:
        return state
    ruled = run / "annotator-trust.gguf"
    if not ruled.exists():
        say("trust", f"which labels to accept without review: at most {opts.trust_target:.0%} disagreement, "
                     f"promised at {1 - opts.trust_delta:.0%}, fitted on the {n} test items")
        from edge_annotator.export.trust_rule import write_trusted
        from edge_annotator.runtime.gguf_file import sha256_file

        # embed_spec writes RUN/annotator-trust.gguf whole or not at all, so its presence means done
        rules = write_trusted(out, run / "test-predictions.jsonl", split / "test.jsonl", ruled,
                              opts.trust_target, opts.trust_delta)
        state["trust"] = {"target": opts.trust_target, "delta": opts.trust_delta, "criteria": rules,
                          "sha256": sha256_file(ruled)}
        save()
    atomic_copy(ruled, out)
    man = out.with_name(out.name + ".manifest.json")
    if man.exists():  # the manifest describes OUT: the export, then the rule written into it
        info = json.loads(man.read_text())
        info.update(sha256=state["trust"]["sha256"], trust_rule="fitted on the test items (RUN/fit.json: trust)")
        man.write_text(json.dumps(info, indent=2))
    return state


def _heads(spec: Any, split: Path, run: Path, gguf: Path, opts: FitOptions, state: dict[str, Any],
           say: Callable[[str, str], None]) -> None:
    """Routes head and auto: GGUF, the base GGUF with a head per criterion fitted on its states for
    the train and validation items (their 5-fold cross-validation makes the choices). Auto also
    scores the validation items by heads fitted on the training items alone (state: heads, val)."""
    from edge_annotator.export.heads import head_annotator, summary
    from edge_annotator.hf.quant_grid import gguf_of
    from edge_annotator.runtime.labels import read_labelled

    base = gguf_of(opts.base)
    if base is None:
        raise FitError(f"{opts.base}: the GGUF this base folder was made from is not beside it; the head route reads "
                       f"that file (annotate-cli base gemma3-270m DIR makes both)")
    train, val = ([it for it in read_labelled(split / f, spec, strict=False).items if it.ratings]
                  for f in ("train.jsonl", "val.jsonl"))
    items = train + val
    say("heads", f"reading {len(items)} train and validation items with {base.name}, then a head per criterion")
    done = head_annotator(base, spec, items, gguf, split / "train.jsonl", opts.threads, opts.seed,
                          provenance={"fit": {k: state.get(k) for k in ("options", "split")}},
                          held_out=len(val) if opts.route == "auto" else 0)
    state["heads"] = {"base": base.name, "items": len(items), "seconds": done.seconds,
                      "criteria": summary(done.fits)}
    if done.held_out is not None:  # the validation items' records by heads fitted without them
        from edge_annotator.runtime.files import atomic_write
        from edge_annotator.runtime.records import result_record

        atomic_write(run / "heads-val.jsonl", "".join(json.dumps(result_record(it.id, sc)) + "\n"
                                                      for it, sc in zip(val, done.held_out)))
        state["heads"]["val"] = {"items": len(val), "fitted_on": len(train)}  # after the file: it marks it done


def _route(state: dict[str, Any], run: Path, spec: Any, opts: FitOptions, save: Callable[[], None],
           say: Callable[[str, str], None]) -> str:
    """Route auto: "head" or "lora". The fine-tune (RUN/annotator.gguf) annotates the validation
    items, and its agreement with the humans there is set against the heads' (fitted without them:
    RUN/heads-val.jsonl), by the measure checkpoints are chosen by, the mean over criteria, with a
    paired bootstrap over the items (items sharing a context drawn together). The heads replace the
    fine-tune only where the interval of their gain lies above 0: a few dozen validation items
    leave most differences inside it, and the fine-tune's side is on the items its checkpoint and
    calibration were chosen on."""
    if "route" not in state:
        from edge_annotator.export.heads import context_groups
        from edge_annotator.runtime.jobs import JobOptions, annotate_file
        from edge_annotator.runtime.labels import read_labelled
        from edge_annotator.runtime.records import read_predictions

        split = run / "split"
        val = [it for it in read_labelled(split / "val.jsonl", spec, strict=False).items if it.ratings]
        lora_f = run / "lora-val.jsonl"
        say("route", f"the fine-tune annotates the {len(val)} validation items, to set beside the heads")
        annotate_file(run / "annotator.gguf", split / "val.jsonl", str(lora_f), JobOptions(threads=opts.threads),
                      resume=lora_f.exists())  # a run stopped half way continues the file
        head, lora = (read_predictions(f, spec, need_probs=False) for f in (run / "heads-val.jsonl", lora_f))
        gain = route_gain(spec, val, head, lora, context_groups(spec, val), opts.select_by, opts.seed)
        chose = "head" if gain["ci95"][0] is not None and gain["ci95"][0] > 0 else "lora"
        state["route"] = {"chose": chose, **gain, "items": len(val),
                          "measure": f"validation alpha ({opts.select_by}), the mean over criteria; the heads "
                                     f"replace the fine-tune where the 95% interval of their gain is above 0"}
        save()
        lo, hi = gain["ci95"]
        say("route", f"{chose}: validation alpha {r3(gain['head'])} for the heads on the base, {r3(gain['lora'])} "
                     f"for the fine-tune (gain {r3(gain['gain'])} [{r3(lo)}, {r3(hi)}], {len(val)} items)")
    return str(state["route"]["chose"])


def r3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def route_gain(spec: Any, items: list[Any], a: list[Any], b: list[Any], groups: list[str], select_by: str,
               seed: int = 0) -> dict[str, Any]:
    """The two annotators' alpha with the humans on ITEMS (records A and B, by id), the mean over
    criteria of each one's measure (selection_alpha's: the score's interval alpha against the
    raters' mean for rating scales under select_by score, else the label's against the consensus
    at the criterion's level), A's gain over B and its 95% paired bootstrap interval, the units
    drawn being GROUPS (an item's context, or itself)."""
    import numpy as np

    from edge_annotator.runtime.metrics import _alpha, _code, bootstrap, consensus

    by_a, by_b = {p.id: p for p in a}, {p.id: p for p in b}
    units = sorted(set(groups))
    rows_of = {g: [i for i, x in enumerate(groups) if x == g] for g in units}
    figs = []  # per criterion: item index, A's figure, B's, the humans', level
    for c in spec.criteria:
        use_score = select_by == "score" and c.is_numeric
        rows = []
        for i, it in enumerate(items):
            rs = [r[c.name] for r in it.ratings if c.name in r]
            pa, pb = by_a.get(it.id), by_b.get(it.id)
            if not rs or pa is None or pb is None or c.name not in pa.labels or c.name not in pb.labels:
                continue
            if use_score:
                rows.append((i, pa.scores[c.name], pb.scores[c.name], float(np.mean([float(v) for v in rs]))))
            else:
                rows.append((i, _code(c, pa.labels[c.name]), _code(c, pb.labels[c.name]), _code(c, consensus(c, rs))))
        figs.append((np.array(rows, dtype=float).reshape(-1, 4), "interval" if use_score else c.level))

    def alphas(ix: np.ndarray) -> tuple[float, float] | None:
        counts = np.bincount(np.concatenate([rows_of[units[k]] for k in ix]), minlength=len(items))
        sa, sb = [], []
        for arr, level in figs:
            sel = np.repeat(arr, counts[arr[:, 0].astype(int)], axis=0)  # a unit drawn twice counts twice
            fa, fb = _alpha([sel[:, 1], sel[:, 3]], level), _alpha([sel[:, 2], sel[:, 3]], level)
            sa.append(-1.0 if fa is None else fa)
            sb.append(-1.0 if fb is None else fb)
        return (float(np.mean(sa)), float(np.mean(sb))) if sa else None

    whole = alphas(np.arange(len(units)))
    if whole is None:
        return {"head": None, "lora": None, "gain": None, "ci95": [None, None], "units": len(units)}

    def gain(ix: np.ndarray) -> float | None:
        got = alphas(ix)
        return None if got is None else got[0] - got[1]

    lo, hi = bootstrap(gain, len(units), seed=seed)
    return {"head": whole[0], "lora": whole[1], "gain": whole[0] - whole[1], "ci95": [lo, hi], "units": len(units)}


def _load(cfg_f: Path) -> Any:
    from .config import load_config

    return load_config(cfg_f)


def _recipe(spec_path: str | Path, split: Path, run: Path, opts: FitOptions) -> dict[str, Any]:
    """The small-data recipe for these items (train/recipe.py), max_length from their own lengths."""
    from edge_annotator.hf.score import hf_tokenize
    from edge_annotator.runtime.prompt import leading_inputs, shared_groups
    from edge_annotator.runtime.spec import load_spec

    from .config import Augment, TokenDropout, top_layers
    from .examples import load_items
    from .model import load_tokenizer
    from .recipe import augmentation, small_data_config
    from .trainer import longest_tokens

    spec = load_spec(spec_path)
    items = load_items(split / "train.jsonl", spec)
    tok = hf_tokenize(load_tokenizer(opts.base))
    aug = augmentation(opts.augment)
    longest = max(longest_tokens(spec, items, tok, aug["templates"]), default=64)
    keeps = Augment(permute_inputs=aug["permute_inputs"], token_dropout=TokenDropout(**aug["token_dropout"]))
    groups = shared_groups([leading_inputs(spec, it.fields) for it in items]) if keeps.keeps_contexts else None
    raw = small_data_config(str(spec_path), str(split / "train.jsonl"), str(split / "val.jsonl"), opts.base,
                            str(run / "train"), items=len(items), criteria=len(spec.criteria), longest=longest,
                            seed=opts.seed, augment=opts.augment,
                            context=int(statistics.median_low(len(g) for g in groups)) if groups else 1)
    raw["select_by"] = opts.select_by
    raw["qat"] = opts.qat
    if opts.tiny:  # as configs/tiny-lora-cpu.yaml builds it
        raw |= {"tiny": {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 2, "head_dim": 32},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "lr": 3.0e-3}
    if opts.top_layers:
        try:
            raw["lora"]["layers"] = top_layers(opts.base, opts.top_layers, raw["tiny"]["layers"] if opts.tiny else None)
        except ValueError as e:
            raise FitError(str(e)) from None
    return raw


def _estimated(raw: dict[str, Any], opts: FitOptions, state: dict[str, Any]) -> dict[str, Any]:
    """Time two steps and a validation (train/check.py), then cut the steps to the budget."""
    from edge_annotator.runtime.spec import load_spec

    from .check import check_run, estimate_seconds
    from .config import parse_config
    from .recipe import BudgetTooSmall, fit_to_budget

    got = check_run(parse_config(raw, "fit recipe"))
    try:
        sized = fit_to_budget(raw, got["step_s"], got["validation_s"], opts.budget_s, got["repeat_step_s"],
                              got["steps_per_pass"])
    except BudgetTooSmall as e:
        raise FitError(f"{e} (add --resume to keep this run's split)") from None
    items_per_step = raw["batch_size"] // len(load_spec(raw["spec"]).criteria)
    got = {**got, "steps": sized["max_steps"], "validations": 1 + math.ceil(sized["max_steps"] / sized["eval_every"]),
           "estimate_s": estimate_seconds(sized["max_steps"], sized["eval_every"], got["step_s"], got["validation_s"],
                                          True, got["repeat_step_s"], got["steps_per_pass"]),
           "epochs": round(sized["max_steps"] * items_per_step / max(got["train_items"], 1), 2)}
    state["estimate"] = got
    state["recipe"] = {**state.get("recipe", {}), "max_steps": sized["max_steps"], "eval_every": sized["eval_every"]}
    log.info("fit: %d steps, estimated %.1f min", sized["max_steps"], got["estimate_s"] / 60)
    return sized


def _provenance_add(merged: Path, extra: dict[str, Any]) -> None:
    p = merged / "provenance.json"
    prov = json.loads(p.read_text())
    prov.update(extra)
    p.write_text(json.dumps(prov, indent=2, default=str))


def _training(state: dict[str, Any], opts: FitOptions) -> dict[str, Any] | None:
    """What the report says of the training: the steps made against those planned, and the passes
    over the training items they made (None for a run that trained nothing: the head route)."""
    tr, est = state.get("train"), state.get("estimate")
    if (state.get("route") or {}).get("chose") == "head":
        return None
    if not tr or not est or not est.get("steps"):
        return None
    return {"items": state["split"]["train"]["items"], "steps": tr["steps"], "planned_steps": est["steps"],
            "passes": round(tr["steps"] * est["epochs"] / est["steps"], 2), "minutes": round(tr["seconds"] / 60, 1),
            "budget_minutes": round(opts.budget_s / 60, 1), "best_step": tr["best_step"],
            "val_alpha_untrained": tr["val_alpha_untrained"], "val_alpha": tr["val_alpha"]}


def _test(model: Path, test: Path, pred: Path, report_dir: Path, spec: Any, opts: FitOptions,
          training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Annotate the test items with the published file, then agree and its report."""
    from edge_annotator.runtime.data import read_human
    from edge_annotator.runtime.jobs import JobOptions, annotate_file
    from edge_annotator.runtime.metrics import agreement
    from edge_annotator.runtime.records import by_id, read_predictions
    from edge_annotator.runtime.report import report_files

    pred.unlink(missing_ok=True)
    annotate_file(model, test, str(pred), JobOptions(threads=opts.threads))
    records = read_predictions(pred, spec)
    labels, scores = by_id(records)
    humans = read_human(test, spec)
    rep = agreement(spec, labels, humans, {i: s for i, s in scores.items() if s} or None, loo=True, seed=opts.seed)
    (report_dir.parent / "agree.json").write_text(json.dumps(rep, indent=2) + "\n")
    page = report_files(pred, records, test, humans, spec, report_dir, opts.seed, training, force=True)
    return {"report": str(page), "criteria": {c["criterion"]: {k: c.get(k) for k in (
        "alpha", "score_alpha", "alpha_humans")} | {"leave_one_out": c.get("leave_one_out")} for c in rep["criteria"]},
        "mean": rep["mean"]}
