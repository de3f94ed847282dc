"""The whole main job, as `make demo` runs it: zero-shot baseline, fine-tune, export, parity, annotate.

    python scripts/demo.py --config configs/gemma3-270m-lora-cpu-emobank.yaml --top-layers 9 \\
        --base-gguf models/gemma-3-270m-q4_k_m.gguf --test data/emobank-test-200.jsonl --out models/demo

With --top-layers K the recipe's LoRA goes on the base's top K decoder layers only and the run
trains into OUT/run: `make demo` adapts the top 9 of Gemma 3 270M's 18 layers, which halves a
step on 2 cores (the backward pass stops at layer 9) and learns EmoBank as well in the same 360
steps (docs/measurements.md), so that a bare clone's `make demo` ends within 30 minutes.

Prints one table with three columns (zero-shot base GGUF, fine-tuned HF, exported GGUF) and
writes it to OUT/demo.md and OUT/demo.json. Every figure is measured in this run. Each stage is
the library function its annotate-cli command runs (annotate_file, train_and_merge, export, parity).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from edge_annotator.runtime.data import read_human
from edge_annotator.runtime.jobs import JobOptions, annotate_file
from edge_annotator.runtime.metrics import agreement
from edge_annotator.runtime.records import by_id, read_predictions
from edge_annotator.runtime.spec import TaskSpec, load_spec


def _annotate(model: Path, data: Path, out: Path, spec: Path | None, threads: int) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    annotate_file(model, data, str(out), JobOptions(spec=spec, threads=threads))
    return time.perf_counter() - t0


def _report(spec: TaskSpec, path: Path, humans: dict[str, Any]) -> dict[str, Any]:
    """agree's report of an annotate output: labels and scores against the human ratings."""
    labels, scores = by_id(read_predictions(path, spec))
    return agreement(spec, labels, humans, scores)


def run(config: Path, base_gguf: Path, test: Path, out: Path, threads: int, quant: str,
        top_layers: int | None = None) -> dict[str, Any]:
    from edge_annotator.export.parity import parity
    from edge_annotator.export.route import export_annotator
    from edge_annotator.train.config import load_config
    from edge_annotator.train.config import top_layers as top
    from edge_annotator.train.job import print_validations, train_and_merge

    cfg = load_config(config)
    if top_layers:
        try:
            layers = top(cfg.base_model, top_layers)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        cfg = dataclasses.replace(cfg, output=str(out / "run"), lora=dataclasses.replace(cfg.lora, layers=layers))
    spec = load_spec(cfg.spec)
    out.mkdir(parents=True, exist_ok=True)
    humans = read_human(test, spec)
    stages: dict[str, float] = {}
    res: dict[str, Any] = {"config": str(config), "test": str(test), "items": len(humans), "quant": quant,
                           "lora_layers": cfg.lora.layers}

    # 1. zero-shot: the base GGUF with the spec given on the command line
    zs = out / "zero-shot.jsonl"
    stages["zero-shot annotate"] = _annotate(base_gguf, test, zs, Path(cfg.spec), threads)
    res["zero_shot"] = _report(spec, zs, humans)
    # 2. fine-tune and merge
    t0 = time.perf_counter()
    merged = train_and_merge(cfg, progress=print_validations).merged
    assert merged is not None
    stages["train + merge"] = time.perf_counter() - t0
    # 3. export
    gguf = out / f"annotator-{quant}.gguf"
    res["gguf_file"] = str(gguf)
    t0 = time.perf_counter()
    export_annotator(merged, gguf, quant)
    stages["export"] = time.perf_counter() - t0
    # 4. parity: HF (fine-tuned, fp32) against the exported file, on the held-out items
    t0 = time.perf_counter()
    res["parity"] = parity(merged, gguf, test, threads=threads)
    (out / "parity.json").write_text(json.dumps(res["parity"], indent=2) + "\n")
    stages["parity"] = time.perf_counter() - t0
    # 5. annotate with the exported file, twice: threads 1 and N must give the same bytes
    a1, a2 = out / "annotated-t1.jsonl", out / f"annotated-t{threads}.jsonl"
    _annotate(gguf, test, a1, None, 1)
    stages["annotate (exported)"] = dt = _annotate(gguf, test, a2, None, threads)
    res["identical_across_threads"] = a1.read_bytes() == a2.read_bytes()
    res["gguf"] = _report(spec, a2, humans)
    res["items_per_s"] = {"zero_shot": len(humans) / stages["zero-shot annotate"], "gguf": len(humans) / dt}
    man = json.loads(gguf.with_name(gguf.name + ".manifest.json").read_text())
    base_size = Path(man["base_file"]).stat().st_size if man.get("base_file") else 0
    res["sizes_mb"] = {"base": base_gguf.stat().st_size / 1e6, "gguf": (gguf.stat().st_size + base_size) / 1e6,
                       "adapter": gguf.stat().st_size / 1e6 if base_size else None,
                       "hf": sum(p.stat().st_size for p in merged.glob("*.safetensors")) / 1e6}
    res["stages_s"] = stages
    res["export"] = {k: man.get(k) for k in ("route", "bits_per_weight", "block_bits_per_weight", "block_types",
                                             "adapted_kept", "imatrix", "base_file")}
    if res["export"]["adapted_kept"]:
        res["export"]["adapted_kept"].pop("tensors", None)
    md = table(res, spec.criteria)
    (out / "demo.md").write_text(md)
    (out / "demo.json").write_text(json.dumps(res, indent=2, default=str))
    print(md)
    return res


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def table(res: dict[str, Any], criteria: Any) -> str:
    p = res["parity"]
    hf = {c["criterion"]: c for c in p["criteria"]}
    rows = ["| | zero-shot base (GGUF) | fine-tuned (HF fp32) | exported GGUF " + res["quant"] + " |",
            "|---|---|---|---|"]
    for kind, key, hf_key in (("label", "alpha", "human_alpha_hf"), ("score", "score_alpha", "human_score_alpha_hf")):
        for c in criteria:
            z = next(x for x in res["zero_shot"]["criteria"] if x["criterion"] == c.name)
            g = next(x for x in res["gguf"]["criteria"] if x["criterion"] == c.name)
            rows.append(f"| {kind} alpha with humans: {c.name} | {_f(z.get(key))} | {_f(hf[c.name].get(hf_key))} | "
                        f"{_f(g.get(key))} |")
        rows.append(f"| {kind} alpha with humans: pooled | {_f(res['zero_shot']['pooled'].get(key))} | "
                    f"{_f(p['humans'].get(kind + '_alpha_hf'))} | {_f(res['gguf']['pooled'].get(key))} |")
    hum = res["gguf"]["pooled"].get("alpha_humans")
    per_h = " / ".join(_f(x.get("alpha_humans")) for x in res["gguf"]["criteria"])
    rows.append(f"| the humans' own alpha (per criterion; pooled) | {per_h}; {_f(hum)} | | |")
    th = p["thresholds"]

    def per(key: str, digits: int = 4) -> str:
        return " / ".join(_f(c.get(key), digits) for c in p["criteria"])

    rows.append(f"| parity: prompt tokens identical | | | {p['tokens']['identical']}/{p['tokens']['total']} |")
    rows.append(f"| parity: mean KL(HF, GGUF) per criterion | | | {per('kl_mean')} |")
    rows.append(f"| parity: mean / max change of the score before calibration (allowed {th['score_delta_mean']} / "
                f"{th['score_delta_max']}) | "
                f"| | {per('score_delta_mean')}; {per('score_delta_max')} |")
    flips = " / ".join(f"{c['label_flips']} ({c['label_flips_decisive']})" for c in p["criteria"])
    rows.append(f"| parity: labels flipped (decisively; allowed {th['label_flip_share']:.0%} of items) | | | "
                f"{flips} of "
                f"{p['items']} |")
    rows.append(f"| parity: label alpha HF vs GGUF (reported, not gated) | | | {per('label_alpha', 3)} |")
    rows.append(f"| parity: drop in score alpha with humans (allowed {th['human_alpha_drop']}) | | | "
                f"{_f(p['humans']['drop'])} ({'PASS' if p['checks']['humans'] else 'FAIL'}) |")
    rows.append(f"| parity, all checks | | | {'PASS' if p['pass'] else 'FAIL'} |")
    s = res["sizes_mb"]
    ex_info = res.get("export", {})
    if ex_info.get("route") == "adapter":
        rows.append(f"| file size (MB) | {s['base']:.0f} | {s['hf']:.0f} | {s['gguf']:.0f}: "
                    f"{Path(res['gguf_file']).name} (LoRA adapter, {s['adapter']:.1f}) + "
                    f"{Path(ex_info['base_file']).name} (the untouched base) |")
    else:
        rows.append(f"| file size (MB) | {s['base']:.0f} | {s['hf']:.0f} | {s['gguf']:.0f} |")
    if ex_info.get("block_bits_per_weight") is not None:
        types = ", ".join(f"{k} {v:.0%}" for k, v in (ex_info.get("block_types") or {}).items())
        rows.append(f"| {res['quant']} file: the blocks' matrices, bits/weight | | | "
                    f"{ex_info['block_bits_per_weight']:.2f} ({types}) |")
    kept = ex_info.get("adapted_kept")
    if kept:
        rows.append(f"| {res['quant']} file: LoRA-adapted tensors kept at {kept['type']} | | | {kept['count']} "
                    f"({kept['weight_share']:.1%} of the weights); {ex_info['bits_per_weight']:.2f} bits/weight |")
    ips = res["items_per_s"]
    rows.append(f"| items/s (annotate-cli, {res['items']} items) | {ips['zero_shot']:.2f} | | {ips['gguf']:.2f} |")
    st = res["stages_s"]
    rows.append("| time per stage (s) | " + f"zero-shot annotate {st['zero-shot annotate']:.0f} | "
                f"train + merge {st['train + merge']:.0f} | export {st['export']:.0f}, parity {st['parity']:.0f}, "
                f"annotate {st['annotate (exported)']:.0f} |")
    rows.append(f"| output identical across threads | | | {res['identical_across_threads']} |")
    layers = res.get("lora_layers")
    rows.append("| LoRA on decoder layers | | " + (f"{layers[0]}-{layers[-1]}" if layers else "every layer") + " | |")
    return "\n".join(rows) + "\n"


@click.command()
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("configs/gemma3-270m-lora-cpu-emobank.yaml"), show_default=True)
@click.option("--base-gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("models/gemma-3-270m-q4_k_m.gguf"), show_default=True)
@click.option("--test", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("data/emobank-test-200.jsonl"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("models/demo"),
              show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--quant", default="Q4_K_M", show_default=True)
@click.option("--top-layers", type=click.IntRange(1), default=None,
              help="LoRA on the base's top K decoder layers only; the run goes to OUT/run.  [default: the config's]")
def main(config: Path, base_gguf: Path, test: Path, out: Path, threads: int, quant: str,
         top_layers: int | None) -> None:
    """The whole main job: zero-shot baseline, fine-tune, export, parity, annotate; one table."""
    res = run(config, base_gguf, test, out, threads, quant, top_layers)
    if not res["parity"]["pass"]:
        failed = ", ".join(k for k, v in res["parity"]["checks"].items() if not v)
        print(f"\nPARITY FAILED for {quant} ({failed}): this file would not be published "
              f"(make export deletes such a file). See docs/export.md.", file=sys.stderr)
    if not res["identical_across_threads"]:
        print("\nthe exported file's output differed between thread counts", file=sys.stderr)
    sys.exit(0 if res["parity"]["pass"] and res["identical_across_threads"] else 1)


if __name__ == "__main__":
    main()
