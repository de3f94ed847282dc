"""What holds across runs and --gpu-layers settings: the runtime's determinism contract, measured.

    python -m edge_annotator.bench.determinism MODEL ITEMS [--spec S] --settings 0,12,all \
        [--repeats 2] [--threads 16] [--naive] [--json OUT.json] [--markdown OUT.md]

Each setting annotates ITEMS the way `annotate-cli annotate` does (one model load, the same
Annotator and job writer, the records kept in memory), `--repeats` times. The first setting is the
reference (put 0, the CPU, first). Per setting it reports items/s, whether its repeats wrote the
same bytes, and against the reference: the same bytes?, the share of (item, criterion) labels that
are the same, and the largest change of any level's probability and of any score. `--naive` adds
the plain llama-cpp-python loop (bench/arms.py: one generation per item and criterion, a grammar
of the allowed answers) on the first `--naive-items` items, for each setting.

scripts/gpu_runtime_check.sh runs it on a GPU machine; on a CPU-only build only `--settings 0`
runs (a setting that offloads stops with the build's message).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from edge_annotator.runtime.options import GpuLayers


def annotate_lines(model: Path, items: Path, spec_path: Path | None, gpu_layers: int, threads: int | None,
                   ) -> tuple[list[str], float]:
    """The output lines annotate-cli writes for ITEMS (runtime.jobs.annotate_file, its job function),
    and the seconds the job took, the model's load included."""
    from edge_annotator.runtime.jobs import JobOptions, annotate_file

    out = io.StringIO()
    t0 = time.perf_counter()
    annotate_file(model, items, out, JobOptions(spec=spec_path, threads=threads, gpu_layers=gpu_layers))
    seconds = time.perf_counter() - t0
    return out.getvalue().splitlines(), seconds


def compare(ref: list[str], got: list[str]) -> dict[str, Any]:
    """How far `got` is from `ref`, record by record (the same items in the same order)."""
    if len(ref) != len(got):
        raise ValueError(f"{len(ref)} records against {len(got)}: not the same job")
    same = total = 0
    max_dp = max_ds = 0.0
    for a_line, b_line in zip(ref, got):
        a, b = json.loads(a_line), json.loads(b_line)
        if a.get("id") != b.get("id"):
            raise ValueError(f"record {a.get('id')!r} against {b.get('id')!r}: not the same job")
        if "error" in a or "error" in b:
            continue
        for c, label in a["labels"].items():
            total += 1
            same += label == b["labels"][c]
            max_dp = max(max_dp, *(abs(p - b["probs"][c][k]) for k, p in a["probs"][c].items()))
            if a.get("scores", {}).get(c) is not None:
                max_ds = max(max_ds, abs(a["scores"][c] - b["scores"][c]))
    return {"byte_identical": ref == got, "labels_same": same / total if total else float("nan"),
            "max_abs_dp": max_dp, "max_abs_dscore": max_ds}


def run(model: Path, items: Path, spec: Path | None, settings: list[int], repeats: int, threads: int | None,
        naive: bool, naive_items: int = 200) -> dict[str, Any]:
    from edge_annotator.runtime.engine import backend_info

    from .arms import arm_naive

    n_items = sum(1 for line in items.read_text().splitlines() if line.strip())
    rows, ref = [], None
    for g in settings:
        runs = [annotate_lines(model, items, spec, g, threads) for _ in range(repeats)]
        lines = runs[0][0]
        ref = ref or lines
        row = {"gpu_layers": g, "items_per_s": max(n_items / s for _, s in runs),
               "repeats_byte_identical": all(r[0] == lines for r in runs), "vs_reference": compare(ref, lines)}
        if naive:
            got = arm_naive({"model": str(model), "spec": str(spec), "data": str(items), "n_items": naive_items,
                             "threads": threads or 1, "gpu_layers": g})
            row["naive_items_per_s"] = got["items"] / got["seconds"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return {"model": str(model), "items": n_items, "threads": threads, "repeats": repeats,
            "backend": backend_info(), "settings": rows}


def _name(g: int) -> str:
    return "all" if g < 0 else "0 (CPU)" if g == 0 else str(g)


def markdown(res: dict[str, Any], device: str) -> str:
    lines = [f"Measured by `scripts/gpu_runtime_check.sh` ({res['items']} items, {res['repeats']} runs per "
             f"setting, {res['threads']} threads) on {device}; llama-cpp-python {res['backend']['llama_cpp_python']}, "
             f"GPU offload {'yes' if res['backend']['gpu_offload'] else 'no'}.", "",
             "| --gpu-layers | items/s | naive loop items/s | runs byte-identical | same bytes as CPU | "
             "labels as CPU | max abs d p | max abs d score |", "|---|---|---|---|---|---|---|---|"]
    for r in res["settings"]:
        v = r["vs_reference"]
        naive = f"{r['naive_items_per_s']:.2f}" if "naive_items_per_s" in r else "n/a"
        lines.append(f"| {_name(r['gpu_layers'])} | {r['items_per_s']:.2f} | {naive} | "
                     f"{'yes' if r['repeats_byte_identical'] else 'NO'} | {'yes' if v['byte_identical'] else 'no'} | "
                     f"{v['labels_same']:.2%} | {v['max_abs_dp']:.2e} | {v['max_abs_dscore']:.2e} |")
    return "\n".join(lines) + "\n"


def _settings(ctx: click.Context, param: click.Parameter, text: str) -> list[int]:
    """Comma-separated --gpu-layers values, each read as --gpu-layers reads one."""
    return [GpuLayers().convert(s, param, ctx) for s in text.split(",")]


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("items", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--spec", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--settings", callback=_settings, default="0", show_default=True,
              help="Comma-separated --gpu-layers values, CPU first.")
@click.option("--repeats", type=click.IntRange(1), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--naive", is_flag=True, help="Also time the plain llama-cpp-python loop per setting.")
@click.option("--naive-items", type=click.IntRange(1), default=200, show_default=True,
              help="The first N items for the plain loop.")
@click.option("--device", default="this machine", show_default=True, help="The device's name for the table.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model: Path, items: Path, spec: Path | None, settings: list[int], repeats: int, threads: int | None,
         naive: bool, naive_items: int, device: str, json_path: Path | None, md_path: Path | None) -> None:
    """Run MODEL over ITEMS as annotate does, per --gpu-layers setting: same bytes? how fast?

    \b
    Examples:
      python -m edge_annotator.bench.determinism annotator.gguf data/emobank-test-50.jsonl --settings 0,all
      python -m edge_annotator.bench.determinism base.gguf items.jsonl --spec tasks/emobank.yaml --naive
    """
    if naive and spec is None:
        raise click.UsageError("--naive needs --spec (the plain loop renders prompts from a spec file)")
    res = run(model, items, spec, settings, repeats, threads, naive, naive_items)
    md = markdown(res, device)
    print(md)
    if json_path:
        json_path.write_text(json.dumps(res, indent=2))
    if md_path:
        md_path.write_text(md)


if __name__ == "__main__":
    main()
