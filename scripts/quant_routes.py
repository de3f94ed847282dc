"""Quantization routes side by side: one fine-tune exported several ways, each file through parity
on a full test split against the merged HF model (scored once).

    make quant-routes      # the demo recipe (EmoBank) and the ConvAbuse and GoEmotions runs
    python scripts/quant_routes.py --run models/runs/gemma3-270m-lora-cpu-emobank \\
        --test models/data/emobank-test.jsonl --calib data/emobank-train-400.jsonl --out models/routes/emobank

Routes (export/hf_to_gguf.py and export/lora_gguf.py):
  q8-adapted      Q4_K_M with the LoRA-adapted tensors kept at Q8_0 (--adapted-type Q8_0)
  q6-adapted      the same at Q6_K, q5-adapted at Q5_K
  q4              Q4_K_M throughout (--adapted-type same)
  q4-imatrix      Q4_K_M throughout with an importance matrix from the training items
  adapter         the untouched base GGUF + the run's LoRA as llama.cpp's adapter file (--adapter-on)
  grid            the same recipe trained again with qat: true (OUT/qat-run, from the run's own config:
                  the same items, steps and seed), its codes written into the base GGUF's blocks
                  (export/grid_route.py); parity against its own merged model

Per route: file size, bits/weight of the blocks' matrices (gguf-py), mean and max |score change|
and decisive label flips against the HF model, alpha with the raters before and after (score
alpha for rating scales, label alpha and macro-F1 for label sets; the label's alpha, averaged
over criteria, for every set), items/s of `annotate` on the first --speed test items with each
file in turn (one process, batch 1, --threads; run it on a quiet machine). Each route's file and
report stay in OUT, so a rerun only does what is missing (--fresh redoes all). Writes OUT/routes.json and OUT/routes.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from edge_annotator.export.grid_route import export_grid
from edge_annotator.export.hf_to_gguf import export
from edge_annotator.export.lora_gguf import block_bits, export_adapter
from edge_annotator.export.parity import parity_many

ROUTES = ["q8-adapted", "q6-adapted", "q5-adapted", "q4", "q4-imatrix", "adapter", "grid"]
TITLES = {"q8-adapted": "Q4_K_M, adapted tensors at Q8_0", "q6-adapted": "Q4_K_M, adapted tensors at Q6_K",
          "q5-adapted": "Q4_K_M, adapted tensors at Q5_K", "q4": "Q4_K_M throughout",
          "q4-imatrix": "Q4_K_M throughout, imatrix", "adapter": "base Q4_K_M + LoRA adapter (F16)",
          "grid": "trained on the base's grid (qat), Q4_K_M blocks, one file"}


def make_file(route: str, merged: Path, out: Path, base_gguf: Path, calib: Path | None, threads: int) -> Path:
    """The route's GGUF in OUT (made once); for the adapter route, the base is linked beside it.
    MERGED is the qat run's for the grid route."""
    f = out / f"{route}.gguf"
    if f.exists():
        return f
    t0 = time.perf_counter()
    if route == "grid":
        export_grid(merged, f, base_gguf)
    elif route == "adapter":
        link = out / base_gguf.name
        if not link.exists():
            link.symlink_to(base_gguf.resolve())
        export_adapter(merged, f, link)
    elif route == "q4-imatrix":
        if calib is None:
            raise click.UsageError("route q4-imatrix needs --calib (the task's training items)")
        export(merged, f, "Q4_K_M", threads, "same", calib, 64)
    else:
        kept = {"q8-adapted": "Q8_0", "q6-adapted": "Q6_K", "q5-adapted": "Q5_K", "q4": "same"}[route]
        export(merged, f, "Q4_K_M", threads, kept)
    print(f"{route}: {f} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return f


def qat_twin(run_dir: Path, out: Path) -> Path:
    """OUT/qat-run: RUN_DIR's recipe (its merged model's provenance config: items, steps, seed)
    trained again with qat: true and merged; trained once, and continued where it was left."""
    from edge_annotator.train.config import parse_config
    from edge_annotator.train.job import print_validations, train_and_merge

    twin = out / "qat-run"
    if not (twin / "merged" / "spec.json").is_file():
        raw = json.loads((run_dir / "merged" / "provenance.json").read_text())["config"]
        raw.update(qat=True, output=str(twin), name=f"{raw.get('name') or run_dir.name}-qat")
        t0 = time.perf_counter()
        train_and_merge(parse_config(raw, str(run_dir / "merged" / "provenance.json")), resume=True,
                        progress=print_validations)
        print(f"qat twin of {run_dir}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return twin


def speed(files: dict[str, Path], test: Path, n: int, threads: int, out: Path) -> dict[str, float]:
    """Items/s of `annotate` (one process, batch 1) on the first N test items, each file in turn; run
    on a quiet machine (parity's own timing shares the CPU with whatever else runs)."""
    from edge_annotator.runtime.jobs import JobOptions, annotate_file

    sample = out / f"speed-{n}.jsonl"
    with test.open() as src, sample.open("w") as dst:
        for i, line in enumerate(src):
            if i == n:
                break
            dst.write(line)
    got = {}
    for route, f in files.items():
        sink = out / f"speed-{route}.jsonl"
        sink.unlink(missing_ok=True)
        t0 = time.perf_counter()
        annotate_file(f, sample, str(sink), JobOptions(threads=threads))
        got[route] = round(n / (time.perf_counter() - t0), 2)
        sink.unlink()
        print(f"{route}: {got[route]} items/s", file=sys.stderr)
    return got


def summary(route: str, f: Path, rep: dict[str, Any], base_gguf: Path) -> dict[str, Any]:
    if route == "adapter":
        bits = block_bits(base_gguf, f)
        size = f.stat().st_size + base_gguf.stat().st_size
    else:
        bits = block_bits(f)
        size = f.stat().st_size
    per = rep["criteria"]
    row: dict[str, Any] = {
        "route": route, "title": TITLES[route], "size_mb": round(size / 1e6, 1),
        "file_mb": round(f.stat().st_size / 1e6, 1), **bits, "items": rep["items"], "pass": rep["pass"],
        "checks": rep["checks"], "decisive_flips": sum(p["label_flips_decisive"] for p in per),
        "flips": sum(p["label_flips"] for p in per),
        "items_per_s": round(rep["items"] / rep["gguf_seconds"], 2),
        "alpha_hf": rep["humans"]["alpha_hf"], "alpha_gguf": rep["humans"]["alpha_gguf"],
        "alpha_drop": rep["humans"]["drop"],
        "criteria": {p["criterion"]: {k: p.get(k) for k in (
            "score_delta_mean", "score_delta_max", "label_flips_decisive", "human_score_alpha_hf",
            "human_score_alpha_gguf", "human_alpha_hf", "human_alpha_gguf", "human_macro_f1_hf",
            "human_macro_f1_gguf") if p.get(k) is not None} for p in per},
    }
    return row


def _mean(xs: list[float | None]) -> float | None:
    """The mean over criteria, as parity's gated alpha is (hf/score.selection_alpha); None where a
    criterion has none."""
    got = [x for x in xs if x is not None]
    return sum(got) / len(got) if got and len(got) == len(xs) else None


def _r(x: float | None, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def trained(run: Path) -> str:
    """A run's steps, best step and training time, from its timing.json and checkpoint state."""
    t = json.loads((run / "timing.json").read_text()) if (run / "timing.json").is_file() else {}
    st = run / "checkpoint" / "state.json"
    best = json.loads(st.read_text()).get("best_step") if st.is_file() else None
    mins = f", {t['train_s'] / 60:.1f} min training" if "train_s" in t else ""
    return f"{t.get('steps', '?')} steps (best {best}){mins}"


def markdown(name: str, rows: list[dict[str, Any]], notes: str = "") -> str:
    crit = list(rows[0]["criteria"]) if rows else []
    scales = [c for c in crit if "score_delta_mean" in rows[0]["criteria"][c]]
    out = [f"**{name}** ({rows[0]['items'] if rows else 0} test items; per criterion "
           + " / ".join(crit) + ")", "",
           "| route | size | blocks' bits/weight | mean / max \\|score change\\| | decisive flips | "
           "alpha with raters, HF -> GGUF (drop) | label alpha HF -> GGUF | macro-F1 HF -> GGUF | items/s | parity |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cs = r["criteria"]
        deltas = (" / ".join(_r(cs[c]["score_delta_mean"]) for c in scales) + "; "
                  + " / ".join(_r(cs[c]["score_delta_max"]) for c in scales)) if scales else "-"
        label_alpha = [_mean([cs[c].get(f"human_alpha_{k}") for c in crit]) for k in ("hf", "gguf")]
        f1 = [c for c in crit if "human_macro_f1_hf" in cs[c]]
        f1s = "; ".join(f"{_r(cs[c]['human_macro_f1_hf'])} -> {_r(cs[c]['human_macro_f1_gguf'])}" for c in f1) or "-"
        bits = _r(r["block_bits_per_weight"], 2)
        if "block_bits_per_weight_with_adapter" in r:
            bits += f" ({_r(r['block_bits_per_weight_with_adapter'], 2)} with the adapter)"
        failed = ", ".join(k for k, v in r["checks"].items() if not v)
        out.append(f"| {r['title']} | {r['size_mb']} MB | {bits} | {deltas} | {r['decisive_flips']} | "
                   f"{_r(r['alpha_hf'])} -> {_r(r['alpha_gguf'])} ({_r(r['alpha_drop'])}) | "
                   f"{_r(label_alpha[0])} -> {_r(label_alpha[1])} | {f1s} | "
                   f"{r['items_per_s']} | {'PASS' if r['pass'] else 'FAIL (' + failed + ')'} |")
    return "\n".join(out + ([f"\n{notes}"] if notes else [])) + "\n"


@click.command()
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A training run folder (merged/ and best-adapter/ inside).")
@click.option("--test", "test_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The full test split with its raters' labels.")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training items for the importance matrix (route q4-imatrix).")
@click.option("--base-gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("models/gemma-3-270m-q4_k_m.gguf"), show_default=True,
              help="The GGUF the run's base was dequantized from (route adapter).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--route", "routes", type=click.Choice(ROUTES), multiple=True, help="Only these (repeat) [default: all].")
@click.option("--name", default=None, help="The table's title [default: the run folder's name].")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--speed", "speed_items", type=click.IntRange(0), default=200, show_default=True,
              help="Time annotate on this many test items with each file (0: use parity's timing).")
@click.option("--fresh", is_flag=True, help="Redo every file and report.")
def main(run_dir: Path, test_path: Path, calib: Path | None, base_gguf: Path, out: Path, routes: tuple[str, ...],
         name: str | None, threads: int, speed_items: int, fresh: bool) -> None:
    """Export one run by every quantization route and compare the files on a full test split."""
    out.mkdir(parents=True, exist_ok=True)
    todo = list(routes) or ROUTES
    source = {r: (qat_twin(run_dir, out) if r == "grid" else run_dir) / "merged" for r in todo}
    files = {}
    for route in todo:
        if fresh:
            for p in (out / f"{route}.gguf", out / f"{route}.gguf.manifest.json", out / f"{route}.json"):
                p.unlink(missing_ok=True)
        files[route] = make_file(route, source[route], out, base_gguf, calib, threads)
    for merged in dict.fromkeys(source.values()):  # each merged model scored once for all its files
        need = [r for r in todo if source[r] == merged and not (out / f"{r}.json").exists()]
        if not need:
            continue
        t0 = time.perf_counter()
        reps = parity_many(merged, [files[r] for r in need], test_path, threads=threads)
        for r, rep in zip(need, reps):
            (out / f"{r}.json").write_text(json.dumps(rep, indent=1))
        print(f"parity of {len(need)} files on {test_path}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = [summary(r, files[r], json.loads((out / f"{r}.json").read_text()), base_gguf) for r in todo]
    if speed_items:
        fast = speed(files, test_path, speed_items, threads, out)
        for row in rows:
            row["items_per_s"], row["items_per_s_of"] = fast[row["route"]], f"annotate, first {speed_items} items"
    (out / "routes.json").write_text(json.dumps({"run": str(run_dir), "test": str(test_path),
                                                 "threads": threads, "cpu_count": os.cpu_count(), "routes": rows},
                                                indent=1))
    notes = f"The run: {trained(run_dir)}."
    if "grid" in todo:
        notes += f" Its qat twin: {trained(out / 'qat-run')}."
    md = markdown(name or run_dir.name, rows, notes)
    (out / "routes.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
