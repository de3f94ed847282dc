"""`annotate-cli bench`: edge-annotator against the naive llama-cpp-python loop, HF transformers
and llama.cpp's own prompt-processing rate, side by side in one run.

    annotate-cli bench --model models/gemma-3-270m-q4_k_m.gguf --hf-dir models/gemma-3-270m-hf \\
        --json models/bench.json --markdown docs/benchmarks.md
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from edge_annotator.bench.markdown import write_section
from edge_annotator.runtime.cpu import cpu_name
from edge_annotator.runtime.options import Command, gpu_layers_option

err = Console(stderr=True)

# Targets from the throughput issue, as ratios measured side by side.
TARGETS = {"vs_naive": 5.0, "vs_hf": 3.0, "vs_pp512": 0.80, "rss_headroom_mb": 300.0}


def _run_arm(arm: str, args: dict[str, Any]) -> dict[str, Any]:
    err.print(f"[bold]bench[/] {arm} ...")
    r = subprocess.run([sys.executable, "-m", "edge_annotator.bench.arms", arm, json.dumps(args)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise click.ClickException(f"bench arm {arm} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    pairs = [(x[k], y.get(k)) for x, y in zip(a, b) for k in x]
    return sum(1 for x, y in pairs if x == y) / len(pairs) if pairs else float("nan")


def run_bench(model: Path, hf_dir: Path | None, spec: Path, data: Path, n_items: int, threads: int,
              batch: int, gpu_layers: int = 0) -> dict[str, Any]:
    base = {"model": str(model), "spec": str(spec), "data": str(data), "n_items": n_items, "threads": threads,
            "gpu_layers": gpu_layers}
    res: dict[str, Any] = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
                    "python": platform.python_version(), "gpu_layers": gpu_layers},
        "model": model.name, "spec": spec.name, "data": data.name, "items": n_items,
    }
    # llama.cpp's own rate, measured at the start and again at the end of the run: this shared VM's
    # speed drifts by ~10% within minutes, and the ratio should not depend on where pp512 fell
    pp_first = _run_arm("pp512", base)
    res["annotate"] = _run_arm("annotate", base)
    # the same scorer with llama.cpp's full output layer: what the answer-only head saves
    res["annotate_full_logits"] = _run_arm("annotate", {**base, "answer_head": False})
    if batch > 1:
        res[f"annotate_batch{batch}"] = _run_arm("annotate", {**base, "batch": batch})
    res["naive"] = _run_arm("naive", base)
    if hf_dir is not None:
        res["hf"] = _run_arm("hf", {**base, "hf_dir": str(hf_dir), "n_items": min(n_items, 20)})
    pp_last = _run_arm("pp512", base)
    rates = pp_first["all"] + pp_last["all"]
    res["pp512"] = {"tokens_per_s": sorted(rates)[len(rates) // 2], "all": rates,
                    "first_median": pp_first["tokens_per_s"], "last_median": pp_last["tokens_per_s"],
                    "peak_rss_mb": max(pp_first["peak_rss_mb"], pp_last["peak_rss_mb"])}
    for k in [k for k in res if k.startswith(("annotate", "naive", "hf"))]:
        r = res[k]
        r["items_per_s"] = r["items"] / r["seconds"]
        if "tokens" in r:
            r["unique_tokens_per_s"] = r["tokens"] / r["seconds"]
    ratios: dict[str, Any] = {}
    for k in [k for k in res if k.startswith("annotate")]:
        a = res[k]
        ratios[k] = {
            "vs_naive": a["items_per_s"] / res["naive"]["items_per_s"],
            "vs_hf": a["items_per_s"] / res["hf"]["items_per_s"] if "hf" in res else None,
            "vs_pp512": a["unique_tokens_per_s"] / res["pp512"]["tokens_per_s"],
            "rss_headroom_mb": a["peak_rss_mb"] - a["model_mb"],
            "labels_equal_naive": _agreement(a["labels"], res["naive"]["labels"]),
            "labels_equal_hf": _agreement(a["labels"], res["hf"]["labels"]) if "hf" in res else None,
        }
        ratios[k]["meets"] = {
            "vs_naive": ratios[k]["vs_naive"] >= TARGETS["vs_naive"],
            "vs_hf": ratios[k]["vs_hf"] is not None and ratios[k]["vs_hf"] >= TARGETS["vs_hf"],
            "vs_pp512": ratios[k]["vs_pp512"] >= TARGETS["vs_pp512"],
            "rss": ratios[k]["rss_headroom_mb"] <= TARGETS["rss_headroom_mb"],
        }
    res["ratios"] = ratios
    for k in list(res):
        if isinstance(res[k], dict):
            res[k].pop("labels", None)
    return res


def markdown(res: dict[str, Any], command: str) -> str:
    m = res["machine"]
    lines = [
        "## Annotation throughput",
        "",
        f"Measured by `{command}` on {m['cpu']}, {m['cores']} cores, {m['threads']} threads, Python {m['python']}.",
        f"Model `{res['model']}`, spec `{res['spec']}` (3 criteria), the first {res['items']} items of "
        f"`{res['data']}` (the HF arm: the first {res['hf']['items'] if 'hf' in res else 0}, it is slow). "
        "Every arm runs in its own process, one after the other, in the same run; "
        "times are medians of 3 repetitions, each starting with an empty cache; pp512 is the median of 10, "
        "5 run before the other arms and 5 after.",
        "",
        "| arm | items/s | unique tokens/s | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    names = {"annotate": "annotate-cli (default)",
             "annotate_full_logits": "annotate-cli with llama.cpp's output layer (answer_head=False)",
             "naive": "naive llama-cpp-python loop", "hf": "HF transformers fp32 generate()"}
    for k in [k for k in res if k.startswith(("annotate", "naive", "hf"))]:
        r = res[k]
        name = names.get(k, f"annotate-cli --batch {k.removeprefix('annotate_batch')}")
        toks = f"{r['unique_tokens_per_s']:.0f}" if "unique_tokens_per_s" in r else ""
        lines.append(f"| {name} | {r['items_per_s']:.2f} | {toks} | {r['peak_rss_mb']:.0f} |")
    lines.append(f"| llama.cpp pp512 (default context settings) | | {res['pp512']['tokens_per_s']:.0f} | "
                 f"{res['pp512']['peak_rss_mb']:.0f} |")
    pp = res["pp512"]
    lines += ["", f"Model file: {res['annotate']['model_mb']:.0f} MB. pp512 before the other arms: "
                  f"{pp['first_median']:.0f} tokens/s, after: {pp['last_median']:.0f} (the table: median of all 10).",
              "",
              "| ratio | target | " + " | ".join(f"`{k}`" for k in res["ratios"]) + " |",
              "|---|---|" + "---|" * len(res["ratios"])]
    rows = [("items/s vs naive loop", "vs_naive", f">= {TARGETS['vs_naive']}x", "{:.2f}x"),
            ("items/s vs HF fp32", "vs_hf", f">= {TARGETS['vs_hf']}x", "{:.2f}x"),
            ("unique tokens/s vs pp512", "vs_pp512", f">= {TARGETS['vs_pp512']:.0%}", "{:.0%}"),
            ("peak RSS - model size", "rss_headroom_mb", f"<= {TARGETS['rss_headroom_mb']:.0f} MB", "{:.0f} MB")]
    for label, key, target, fmt in rows:
        cells = []
        for k, r in res["ratios"].items():
            v = r[key]
            ok = r["meets"]["rss" if key == "rss_headroom_mb" else key]
            cells.append("n/a" if v is None else f"{fmt.format(v)} {'(met)' if ok else '(NOT met)'}")
        lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")
    lines.append("| labels equal to the naive loop's | | " +
                 " | ".join(f"{r['labels_equal_naive']:.0%}" for r in res["ratios"].values()) + " |")
    hc = res["annotate"].get("head_check", {})
    if hc.get("used"):
        lines += ["", f"The default reads only the answer tokens' logits from the final hidden state (runtime/head.py, "
                      f"`{hc['tensor']}` {hc['type']}); at load it agreed with llama.cpp's logits to "
                      f"{hc['max_abs_error']} on logits up to {hc['max_abs_logit']}."]
    return "\n".join(lines) + "\n"


@click.command(cls=Command)
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("models/gemma-3-270m-q4_k_m.gguf"), show_default=True)
@click.option("--hf-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="HF folder of the same model for the transformers arm (skipped if not given).")
@click.option("--spec", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("tasks/emobank.yaml"), show_default=True)
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("data/emobank-test-50.jsonl"), show_default=True)
@click.option("--items", "n_items", type=click.IntRange(1), default=50, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--batch", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Also measure annotate-cli --batch N (1: skip).")
@gpu_layers_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--markdown", "md_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def bench(model: Path, hf_dir: Path | None, spec: Path, data: Path, n_items: int, threads: int, batch: int,
          gpu_layers: int, json_out: Path | None, md_out: Path | None) -> None:
    """Throughput of annotate-cli against what users would otherwise run, side by side.

    \b
    Examples:
      annotate-cli bench                                   # llama.cpp arms only
      annotate-cli bench --hf-dir models/gemma-3-270m-hf --markdown docs/benchmarks.md
    """
    res = run_bench(model, hf_dir, spec, data, n_items, threads, batch, gpu_layers)
    md = markdown(res, "make bench")
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
    if md_out:
        write_section(md_out, "annotate", md)
    click.echo(json.dumps(res["ratios"], indent=2))
    t = Table(title="ratios (side by side, this run)")
    t.add_column("annotate arm")
    for c in ("vs naive", "vs HF", "vs pp512", "RSS - model"):
        t.add_column(c, justify="right")
    for k, r in res["ratios"].items():
        t.add_row(k, f"{r['vs_naive']:.2f}x", "n/a" if r["vs_hf"] is None else f"{r['vs_hf']:.2f}x",
                  f"{r['vs_pp512']:.0%}", f"{r['rss_headroom_mb']:.0f} MB")
    err.print(t)
