"""`annotate-cli export` and `annotate-cli parity`, rows of runtime/commands.py's table (they need the
export extra: transformers, and llama.cpp's converter)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from edge_annotator.runtime.options import Command, gpu_layers_option

from .quants import ADAPTED_TYPES, FILE_TYPES

err = Console(stderr=True)


@click.command(cls=Command)
@click.argument("merged", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .gguf to write (atomically; a manifest with checksums goes beside it).")
@click.option("--quant", type=click.Choice(FILE_TYPES), default="Q4_K_M",
              show_default=True)
@click.option("--adapted-type", type=click.Choice([*ADAPTED_TYPES, "same"]), default="Q8_0", show_default=True,
              help="Type the LoRA-adapted tensors keep when --quant is narrower (their updates are smaller than "
                   "a 4-bit step); 'same' quantizes them like the rest.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration items (JSONL/CSV in the task's format) for an importance matrix.")
@click.option("--imatrix-items", type=click.IntRange(1), default=32, show_default=True,
              help="How many calibration items the importance matrix reads.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Quantizer threads [default: all cores].")
@click.option("--route", type=click.Choice(["auto", "adapter", "grid", "merged"]), default="auto", show_default=True,
              help="adapter: the untouched base GGUF the run's base was made from + the run's LoRA as llama.cpp's "
                   "adapter file beside it (4-bit blocks, the trained model exactly); grid: a run trained with qat "
                   "written into that base file's blocks (one file, the base's types); merged: one file, the adapted "
                   "tensors at --adapted-type. auto: for Q4_K_M where the base GGUF is found, grid for a qat run, "
                   "else adapter; merged otherwise.")
@click.option("--base-gguf", "--adapter-on", "adapter_on", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="The base GGUF for the adapter and grid routes [default: the one the run's base "
                                 "folder names, found beside it]; implies --route adapter unless --route grid.")
@click.option("--adapter-type", type=click.Choice(["F16", "F32"]), default="F16", show_default=True,
              help="The adapter route: the type of the adapter's matrices.")
def export(merged: Path, output: Path, quant: str, adapted_type: str, imatrix: Path | None, imatrix_items: int,
           threads: int | None, route: str, adapter_on: Path | None, adapter_type: str) -> None:
    """Turn a merged model folder (annotate-cli train) into a quantized GGUF annotator.

    Q4_K_M, where the run's base was made from a GGUF (annotate-cli base), is that untouched base
    + the run's LoRA as llama.cpp's adapter file: OUTPUT (the adapter, with the spec) and the base
    beside it; for a run trained with qat: true, that base file with the trained codes in its
    blocks (one file). Otherwise llama.cpp's converter and quantizer make one merged file. The spec and
    provenance are embedded, and the file is checked to load and tokenize exactly as the HF
    tokenizer did in training.

    \b
    Examples:
      annotate-cli export models/runs/emobank/merged -o emobank.gguf
      annotate-cli export models/runs/emobank/merged -o emobank-q8.gguf --quant Q8_0
      annotate-cli export merged/ -o emobank-one-file.gguf --route merged
      annotate-cli export merged/ -o all-4bit.gguf --route merged --adapted-type same --imatrix train.jsonl
      annotate-cli export merged/ -o emobank-lora.gguf --adapter-on models/gemma-3-270m-q4_k_m.gguf
      annotate-cli export qat-run/merged -o emobank.gguf --route grid     # a run trained with qat: true
    """
    from .route import export_annotator

    if adapter_on is not None and route == "merged":
        raise click.UsageError("--base-gguf is the adapter and grid routes' base; it does not go with --route merged")
    if adapter_on is not None and route == "auto":
        route = "adapter"
    job = export_annotator(merged, output, quant, threads, adapted_type, imatrix, imatrix_items, route,
                           adapter_on, adapter_type)  # an ExportError is annotate-cli's one-line error
    i = job.info
    if i["route"] == "adapter":
        err.print(f"{i['file']}: LoRA adapter ({i['adapter_matrices']} matrices, {i['size_bytes'] / 1e6:.1f} MB) "
                  f"over {i['base_file']} ({i['base_size_bytes'] / 1e6:.1f} MB, its blocks at "
                  f"{i['block_bits_per_weight']:.2f} bits/weight, {i['block_bits_per_weight_with_adapter']:.2f} "
                  f"with the adapter); keep the two files together (annotate finds the base beside the adapter, "
                  f"or where --base-model says); manifest {i['file']}.manifest.json")
        return
    if i["route"] == "grid":
        err.print(f"{i['file']}: one file, {Path(i['base_file']).name}'s blocks with the trained codes "
                  f"({i['weights_moved']:,} of {i['weights']:,} weights moved, {i['matrices_changed']} of "
                  f"{i['matrices']} matrices), {i['size_bytes'] / 1e6:.1f} MB, blocks at "
                  f"{i['block_bits_per_weight']:.2f} bits/weight; manifest {i['file']}.manifest.json")
        return
    err.print(f"{i['file']}: {quant}, {i['size_bytes'] / 1e6:.1f} MB, sha256 {i['sha256'][:16]}..., "
              f"{i['bits_per_weight']:.2f} bits/weight (blocks {i['block_bits_per_weight']:.2f}), {i['seconds']}s; "
              f"manifest {i['file']}.manifest.json")
    if i.get("adapted_kept"):
        k = i["adapted_kept"]
        err.print(f"kept the {k['count']} LoRA-adapted tensors ({k['weight_share']:.1%} of the weights) at {k['type']}")


@click.command(cls=Command)
@click.argument("merged", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--max-items", type=click.IntRange(1), default=None)
@click.option("--threads", type=click.IntRange(1), default=None)
@gpu_layers_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def parity(merged: Path, model: Path, data: Path, max_items: int | None, threads: int | None, gpu_layers: int,
           as_json: bool) -> None:
    """Check that MODEL (.gguf) labels like MERGED (its HF source) and agrees with humans as well.

    Per criterion: prompt tokens, allowed-label distributions (KL), scores (mean and max change
    of the probability-weighted mean of the levels), labels (share that flip; alpha HF vs GGUF is
    shown but does not decide) and agreement with the human labels in DATA before and after
    export. Exits 1 when a threshold fails (export/parity.py: THRESHOLDS, per quantization type),
    so a Makefile can refuse to publish the file.

    \b
    Examples:
      annotate-cli parity models/runs/emobank/merged emobank.gguf data/emobank-test-50.jsonl
      annotate-cli parity merged/ model.gguf held-out.jsonl --json | jq .checks
    """
    from .parity import parity as run_parity

    rep = run_parity(merged, model, data, max_items, threads, gpu_layers=gpu_layers)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        t = Table(title=f"parity: {model.name} ({rep['quantization']}) vs {merged}, {rep['items']} items")
        for col in ("criterion", "KL mean", "|d score| mean", "|d score| max", "labels flipped",
                    "label alpha HF vs GGUF", "humans: HF", "humans: GGUF"):
            t.add_column(col, justify="right" if col != "criterion" else "left")

        def f(v: float | None, digits: int = 3) -> str:
            return "n/a" if v is None else f"{v:.{digits}f}"

        for p in rep["criteria"]:
            score = "human_score_alpha_hf" in p
            t.add_row(p["criterion"], f(p["kl_mean"], 4), f(p.get("score_delta_mean"), 4),
                      f(p.get("score_delta_max"), 4), f"{p['label_flips']} ({p['label_flips_decisive']} decisive)",
                      f(p["label_alpha"]), f(p["human_score_alpha_hf" if score else "human_alpha_hf"]),
                      f(p["human_score_alpha_gguf" if score else "human_alpha_gguf"]))
        click.echo()
        Console().print(t)
        tk, hu, th = rep["tokens"], rep["humans"], rep["thresholds"]
        click.echo(f"tokens identical: {tk['identical']}/{tk['total']} (need {th['tokens_identical']:.0%}); "
                   f"allowed: decisive label flips {th['label_flip_share']:.0%} of items, |d score| mean "
                   f"{th['score_delta_mean']} max {th['score_delta_max']}")
        click.echo(f"alpha with humans ({hu['measure']}): HF {f(hu['alpha_hf'])} -> GGUF "
                   f"{f(hu['alpha_gguf'])}, drop {hu['drop']:.3f} (allowed {th['human_alpha_drop']})")
        click.echo("PASS" if rep["pass"] else "FAIL: " + ", ".join(k for k, v in rep["checks"].items() if not v))
    if not rep["pass"]:
        raise SystemExit(1)
