"""QLoRA on a CUDA GPU, offline: NF4 base with bf16 compute, a few steps, merge, check, tokens/s.

    python scripts/gpu_check.py TOKENIZER_DIR [--steps 20] [--device cpu]   # scripts/gpu_check.sh

A development check, kept out of the package: it needs only the installed package (the train
extra), not a checkout, so it runs where the wheel was installed (tests/test_packaging.py).

Uses a small model built from scratch with the tokenizer of TOKENIZER_DIR (any HF folder of a
supported architecture), so it needs no weights and no network. It checks that:
1. QLoRA (bitsandbytes NF4 base, bf16 compute) trains: the loss falls and is finite;
2. the merged weights equal base + (alpha / r) * B @ A for every adapted layer (merged into
   bf16 weights loaded again from disk, never into NF4);
and reports training tokens/s. Exit code 0 only if every check holds.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click


# The tiny recipe (configs/tiny-lora-cpu.yaml) as QLoRA, built here so that an installed package
# needs no checkout: the spec and the 64 EmoBank items ship inside it (runtime/assets.py).
def check_config(tokenizer_dir: Path, out: str, steps: int, device: str) -> dict[str, object]:
    from edge_annotator.runtime.assets import shipped

    return {
        "base_model": str(tokenizer_dir),
        "tiny": {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 2, "head_dim": 32},
        "spec": str(shipped("tasks", "emobank.yaml")),
        "train_data": str(shipped("data", "emobank-train-64.jsonl")),
        "val_fraction": 0.25, "val_max_items": 8, "output": out, "raters": "distribution",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": "nf4", "compute_dtype": "bfloat16" if device == "cuda" else "float32", "device": device,
        "lr": 3.0e-3, "schedule": "linear", "warmup_ratio": 0.05, "epochs": 100, "max_steps": steps,
        "batch_size": 16, "micro_batch": 16, "eval_every": steps, "patience": steps, "seed": 0,
    }


@click.command()
@click.argument("tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cpu: the same QLoRA check with fp32 compute (bitsandbytes' CPU backend), to try an install "
                   "on a machine without a GPU.")
def main(tokenizer_dir: Path, steps: int, device: str) -> None:
    """QLoRA on a CUDA GPU, offline: train a tiny model a few steps, merge, check; exit 0 only if all hold.

    \b
    Examples:
      python scripts/gpu_check.py models/gemma-3-270m-hf --steps 20
      python scripts/gpu_check.py models/gemma-3-270m-hf --steps 2 --device cpu
    """
    sys.exit(check(tokenizer_dir, steps, device))


def check(tokenizer_dir: Path, steps: int, device: str) -> int:
    import torch
    from safetensors.torch import load_file

    from edge_annotator.train.config import parse_config
    from edge_annotator.train.merge import merge
    from edge_annotator.train.trainer import train

    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (--device cpu runs it on the CPU)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(check_config(tokenizer_dir, f"{tmp}/run", steps, device), "gpu-check")
        res = train(cfg)
        losses = [h["loss"] for h in res.history]
        out = merge(cfg, res.output)
        base = load_file(str(res.output / "base" / "model.safetensors"))
        merged = load_file(str(out / "model.safetensors"))
        lora = load_file(str(res.output / "best-adapter" / "adapter_model.safetensors"))
        worst = 0.0
        for k in [k for k in lora if k.endswith("lora_A.weight")]:
            name = k.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
            delta = (cfg.lora.alpha / cfg.lora.r) * (lora[k.replace("lora_A", "lora_B")].float() @ lora[k].float())
            expect = base[name].float() + delta
            worst = max(worst, float((merged[name].float() - expect).abs().max()))
        report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "steps": res.steps,
                  "first_loss": losses[0], "last_loss": losses[-1], "tokens_per_s": res.tokens_per_s,
                  "merge_max_abs_err": worst, "loss_fell": losses[-1] < losses[0],
                  "merge_ok": worst < 2e-2}  # bf16 weights: ~3 digits
        print(json.dumps(report, indent=2))
        return 0 if report["loss_fell"] and report["merge_ok"] and all(x == x for x in losses) else 1


if __name__ == "__main__":
    main()
