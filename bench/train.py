"""Training throughput: logits only at the answer positions vs the full vocabulary head, side by side.

    python -m edge_annotator.bench.train --base models/gemma-3-270m-hf     # make bench-train

Gemma 3 270M in fp32 on the CPU, LoRA on every projection, real EmoBank training examples (the
runtime prompt plus the answer). The two arms alternate step by step in one process, on the
same batches, so machine drift hits both alike; the median step time of each gives the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml


def main(argv: list[str] | None = None) -> int:
    from edge_annotator.runtime.spec import load_spec
    from edge_annotator.train.config import parse_config
    from edge_annotator.train.examples import build_examples, load_items, render
    from edge_annotator.train.model import add_lora, answer_logits, load_base, load_tokenizer
    from edge_annotator.train.trainer import collate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="models/gemma-3-270m-hf")
    ap.add_argument("--config", default="configs/gemma3-270m-lora-cpu-emobank.yaml")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm (after one warm-up each)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    raw = yaml.safe_load(Path(a.config).read_text())
    raw.update(base_model=a.base)
    cfg = parse_config(raw, a.config)
    torch.manual_seed(0)
    spec = load_spec(cfg.spec)
    tok = load_tokenizer(cfg.base_model)
    items = load_items(cfg.train_data, spec)
    examples = build_examples(items, spec, "median")
    model = add_lora(load_base(cfg, torch.device("cpu")), cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    pad = tok.pad_token_id or 0
    times: dict[str, list[float]] = {"answer_only": [], "full_logits": []}
    tokens = 0
    for step in range(a.steps + 1):
        batch = [render(examples[(step * a.micro_batch + k) % len(examples)], items, spec, tok, cfg.augment,
                        np.random.default_rng([0, step, k])) for k in range(a.micro_batch)]
        ids, mask, rows, cols, targets = collate(batch, pad)
        tokens = int(mask.sum())
        for arm in (("answer_only", "full_logits") if step % 2 == 0 else ("full_logits", "answer_only")):
            t0 = time.perf_counter()
            logits = answer_logits(model, ids, mask, rows, cols, answer_only=arm == "answer_only")
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            loss.backward()
            opt.zero_grad(set_to_none=True)  # no update: both arms see the same weights every step
            dt = time.perf_counter() - t0
            if step > 0:  # the first step of each arm is a warm-up
                times[arm].append(tokens / dt)
    res: dict[str, Any] = {k: statistics.median(v) for k, v in times.items()}
    res["ratio"] = res["answer_only"] / res["full_logits"]
    res["target"] = 1.8
    res["micro_batch"] = a.micro_batch
    res["all_tokens_per_s"] = times
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
