"""QLoRA on a CUDA GPU, offline: NF4 base with bf16 compute, a few steps, merge, check, tokens/s.

    python -m edge_annotator.train.gpu_check TOKENIZER_DIR [--steps 20]     # scripts/gpu_check.sh

Uses a small model built from scratch with the tokenizer of TOKENIZER_DIR (any HF folder of a
supported architecture), so it needs no weights and no network. It checks that:
1. QLoRA (bitsandbytes NF4 base, bf16 compute) trains: the loss falls and is finite;
2. the merged weights equal base + (alpha / r) * B @ A for every adapted layer (merged into
   bf16 weights loaded again from disk, never into NF4);
and reports training tokens/s. Exit code 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    import torch
    from safetensors.torch import load_file

    from edge_annotator.train.config import parse_config
    from edge_annotator.train.merge import merge
    from edge_annotator.train.trainer import train

    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer_dir", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "configs" / "tiny-lora-cpu.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        raw.update(base_model=str(a.tokenizer_dir), spec=str(root / "tasks" / "emobank.yaml"),
                   train_data=str(root / "data" / "emobank-train-64.jsonl"), output=f"{tmp}/run",
                   quantization="nf4", compute_dtype="bfloat16", device="cuda", max_steps=a.steps,
                   eval_every=a.steps, patience=a.steps, val_max_items=8)
        cfg = parse_config(raw, "gpu-check")
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
        report = {"device": torch.cuda.get_device_name(0), "steps": res.steps, "first_loss": losses[0],
                  "last_loss": losses[-1], "tokens_per_s": res.tokens_per_s, "merge_max_abs_err": worst,
                  "loss_fell": losses[-1] < losses[0], "merge_ok": worst < 2e-2}  # bf16 weights: ~3 digits
        print(json.dumps(report, indent=2))
        return 0 if report["loss_fell"] and report["merge_ok"] and all(map(lambda x: x == x, losses)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
