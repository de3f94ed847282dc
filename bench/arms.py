"""The things `annotate-cli bench` compares, each run in its own process so its peak RSS is its own.

    python -m edge_annotator.bench.arms ARM '{"model": ..., "items": ..., ...}'   # prints one JSON line

- annotate: edge-annotator's scorer (runtime/annotator.py), optionally with --batch, or with
            llama.cpp's own output layer instead of the answer-only head (answer_head=False).
- naive:    the llama-cpp-python loop a user would write: one completion per item and criterion,
            the full prompt, temperature 0, a grammar limiting the answer to the allowed labels.
- hf:       transformers fp32 generate() on the same model, greedy, 2 new tokens per criterion.
- pp512:    llama.cpp's own prompt-processing rate: one 512-token batch, default context settings.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from edge_annotator.runtime.data import check_item, iter_rows
from edge_annotator.runtime.prompt import render_prompt
from edge_annotator.runtime.spec import load_spec


def _items(args: dict[str, Any]) -> list[dict[str, str]]:
    spec = load_spec(args["spec"])
    out = [check_item(r, spec).fields for r in iter_rows(args["data"])]
    return out[: args["n_items"]]


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def arm_annotate(args: dict[str, Any]) -> dict[str, Any]:
    from edge_annotator.runtime.annotator import Annotator
    from edge_annotator.runtime.engine import LlamaEngine

    spec, items = load_spec(args["spec"]), _items(args)
    eng = LlamaEngine(args["model"], n_threads=args["threads"], answer_head=args.get("answer_head", True),
                      n_gpu_layers=args.get("gpu_layers", 0))
    ann = Annotator(eng, spec, batch=args.get("batch", 1))
    times, tokens = [], 0
    for _ in range(args.get("reps", 3)):
        eng.reset()  # each repetition evaluates the shared instruction again, as a fresh job would
        before = eng.n_evaluated
        t0 = time.perf_counter()
        scores = ann.score_many(items)
        times.append(time.perf_counter() - t0)
        tokens = eng.n_evaluated - before
    labels = [{k: s.label for k, s in sc.items()} for sc in scores]  # type: ignore[union-attr]
    return {"seconds": _median(times), "all_seconds": times, "items": len(items), "tokens": tokens, "labels": labels,
            "head_check": eng.head_check}


@contextlib.contextmanager
def _safe_buffers(model: str) -> Iterator[None]:
    """llama-cpp-python's Llama with the runtime's guard (runtime/cpu.py): on a build whose AMX kernels
    crash on this CPU, its model loads without llama.cpp's extra buffer types, as annotate's does.
    Llama has no argument for it, so the defaults it reads are wrapped while it loads."""
    import llama_cpp.llama as high

    from edge_annotator.runtime.cpu import extra_buffers_safe

    if extra_buffers_safe(model):
        yield
        return
    defaults = high.llama_cpp.llama_model_default_params

    def no_extra() -> Any:
        mp = defaults()
        mp.use_extra_bufts = False
        return mp

    high.llama_cpp.llama_model_default_params = no_extra
    try:
        yield
    finally:
        high.llama_cpp.llama_model_default_params = defaults


def arm_naive(args: dict[str, Any]) -> dict[str, Any]:
    from llama_cpp import Llama, LlamaGrammar

    spec, items = load_spec(args["spec"]), _items(args)
    with _safe_buffers(args["model"]):
        llm = Llama(args["model"], n_threads=args["threads"], n_ctx=2048, n_gpu_layers=args.get("gpu_layers", 0),
                    verbose=False)
    grammars = {c.name: LlamaGrammar.from_string(
        "root ::= \" \" (" + " | ".join(json.dumps(lv.answer) for lv in c.scale) + ")", verbose=False)
        for c in spec.criteria}
    times = []
    for _ in range(args.get("reps", 3)):
        llm.reset()  # forget the cached prompt: each repetition starts like a fresh job
        labels = []
        t0 = time.perf_counter()
        for it in items:
            got = {}
            for c in spec.criteria:
                r = llm.create_completion(render_prompt(spec, it, c), max_tokens=8, temperature=0.0,
                                          grammar=grammars[c.name])
                text = r["choices"][0]["text"].strip()  # type: ignore[index]
                got[c.name] = next((lv.value for lv in c.scale if lv.answer == text), text)
            labels.append(got)
        times.append(time.perf_counter() - t0)
    return {"seconds": _median(times), "all_seconds": times, "items": len(items), "labels": labels}


def arm_hf(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args["threads"])
    spec, items = load_spec(args["spec"]), _items(args)
    tok = AutoTokenizer.from_pretrained(args["hf_dir"])
    model = AutoModelForCausalLM.from_pretrained(args["hf_dir"], dtype=torch.float32, use_safetensors=True).eval()
    labels = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for it in items:
            got = {}
            for c in spec.criteria:
                enc = tok(render_prompt(spec, it, c), return_tensors="pt")
                out = model.generate(**enc, max_new_tokens=2, do_sample=False)
                text = str(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)).strip()
                got[c.name] = next((lv.value for lv in c.scale if text.startswith(lv.answer)), text)
            labels.append(got)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "items": len(items), "labels": labels}


def arm_pp512(args: dict[str, Any]) -> dict[str, Any]:
    """One 512-token batch through a llama.cpp context with llama.cpp's default settings (as llama-bench)."""
    import numpy as np
    from llama_cpp import Llama

    with _safe_buffers(args["model"]):
        llm = Llama(args["model"], n_threads=args["threads"], n_threads_batch=args["threads"], n_ctx=1024,
                    n_batch=512, n_ubatch=512, n_gpu_layers=args.get("gpu_layers", 0), verbose=False)
    toks = np.random.default_rng(0).integers(1000, llm.n_vocab(), 512).tolist()
    rates = []
    llm.eval(toks[:64])  # warm-up
    for _ in range(args.get("reps", 5)):
        llm.reset()
        llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        llm.eval(toks)
        rates.append(512 / (time.perf_counter() - t0))
    return {"tokens_per_s": _median(rates), "all": rates}


ARMS = {"annotate": arm_annotate, "naive": arm_naive, "hf": arm_hf, "pp512": arm_pp512}


@click.command()
@click.argument("arm", type=click.Choice(list(ARMS)))
@click.argument("args_json")
def main(arm: str, args_json: str) -> None:
    """Run one ARM of `annotate-cli bench` in this fresh process and print one JSON line (bench/cli.py
    starts one process per arm, so each measures its own peak memory)."""
    args = json.loads(args_json)
    res = ARMS[arm](args)
    res["peak_rss_mb"] = _peak_rss_mb()
    res["model_mb"] = Path(args["model"]).stat().st_size / 2**20
    print(json.dumps(res))


if __name__ == "__main__":
    main()
