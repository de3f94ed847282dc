"""The training stage: examples, determinism, resume, merge, runs that cannot learn (configs: test_config.py).

Runs on the tiny recipe (a 2-layer model built from scratch with Gemma 3's tokenizer, CPU, fp32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.spec import load_spec
from edge_annotator.train.config import TrainConfig, parse_config
from edge_annotator.train.examples import build_examples, load_items, split_items

pytestmark = pytest.mark.slow
EMO = load_spec(TASKS / "emobank.yaml")


def tiny(tmp_path: Path, gemma_hf: Path, **kw) -> TrainConfig:
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp_path / "run"))
    raw.update(kw)
    return parse_config(raw, "tiny-test")


def test_split_is_by_item_and_raters_modes(tmp_path: Path) -> None:
    items = load_items(DATA / "emobank-train-64.jsonl", EMO)
    tr, va = split_items(items, 0.25, seed=0)
    assert not {i.id for i in tr} & {i.id for i in va} and len(tr) + len(va) == len(items) == 64
    each = build_examples(tr, EMO, "each")
    med = build_examples(tr, EMO, "median")
    assert len(med) == len(tr) and sum(e.queries for e in med) == 3 * len(tr)
    assert all(float(t.max()) == 1.0 for e in med for t in e.targets)  # one level each
    assert len(each) == sum(len(i.ratings) for i in tr)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint" / "adapter.safetensors"))


def test_same_seed_same_adapter_and_resume_is_exact(tmp_path: Path, gemma_hf: Path) -> None:
    from edge_annotator.train.trainer import train

    kw = {"max_steps": 4, "eval_every": 2, "patience": 10, "batch_size": 8, "micro_batch": 4, "val_max_items": 4}
    a = train(tiny(tmp_path / "a", gemma_hf, **kw))
    b = train(tiny(tmp_path / "b", gemma_hf, **kw))
    ta, tb = _adapter(a.output), _adapter(b.output)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(float(v.abs().sum()) > 0 for k, v in ta.items() if "lora_B" in k), "the adapter was trained"
    # interrupted after step 3 (its last checkpoint is step 2's), then resumed
    c_cfg = tiny(tmp_path / "c", gemma_hf, **kw)
    train(c_cfg, stop_after=3)
    c = train(c_cfg, resume=True)
    tc = _adapter(c.output)
    assert all(torch.equal(ta[k], tc[k]) for k in ta)
    import json

    def log_of(run: Path) -> list[dict]:  # everything but the timings
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "examples_per_s")}
                for line in (run / "log.jsonl").read_text().splitlines()]

    assert log_of(a.output) == log_of(c.output)


def test_merge_is_base_plus_scaled_lora_product(tmp_path: Path, gemma_hf: Path) -> None:
    from safetensors.torch import load_file

    from edge_annotator.train.merge import merge
    from edge_annotator.train.trainer import train

    cfg = tiny(tmp_path, gemma_hf, max_steps=2, eval_every=1, patience=10, batch_size=8, micro_batch=8,
               val_max_items=4, lr=0.05)
    res = train(cfg)
    out = merge(cfg, res.output)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert (out / "spec.json").read_text() == EMO.to_json()
    prov = (out / "provenance.json").read_text()
    assert "data_sha256" in prov and "git_commit" in prov
    base = load_file(str(res.output / "base" / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    lora = load_file(str(res.output / "best-adapter" / "adapter_model.safetensors"))
    key = next(k for k in lora if "layers.0.self_attn.q_proj.lora_A" in k)
    a_, b_ = lora[key], lora[key.replace("lora_A", "lora_B")]
    w = "model.layers.0.self_attn.q_proj.weight"
    assert float(b_.abs().sum()) > 0
    torch.testing.assert_close(merged[w], base[w] + (cfg.lora.alpha / cfg.lora.r) * b_ @ a_)

    # --merge-only: the adapter trained elsewhere (a GPU machine) merged apart from training, alike
    import json
    import shutil

    from click.testing import CliRunner

    from edge_annotator.train.cli import train as train_cmd

    shutil.rmtree(out)
    cfg_path = tmp_path / "c.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp_path / "run"))
    cfg_path.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(train_cmd, [str(cfg_path), "--merge-only"])
    assert r.exit_code == 0, r.output
    again = load_file(str(out / "model.safetensors"))
    assert set(again) == set(merged) and all(torch.equal(again[k], merged[k]) for k in merged)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["merged_apart_from_training"] and prov["val_alpha"] == res.state.best_alpha
    shutil.rmtree(res.output / "best-adapter")
    r = CliRunner().invoke(train_cmd, [str(cfg_path), "--merge-only"])
    assert r.exit_code == 1 and "no adapter to merge" in r.output


def test_qlora_nf4_trains_on_cpu(tmp_path: Path, gemma_hf: Path) -> None:
    import bitsandbytes as bnb

    from edge_annotator.train.model import add_lora, load_base, pick_device
    from edge_annotator.train.trainer import train

    cfg = tiny(tmp_path, gemma_hf, quantization="nf4", max_steps=2, eval_every=2, batch_size=4, micro_batch=4,
               val_max_items=4)
    res = train(cfg)
    assert res.state.step == 2 and np.isfinite(res.history[-1]["loss"])
    model = add_lora(load_base(cfg, pick_device(cfg), res.output / "base"), cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_tiny_recipe_beats_the_untrained_model(tmp_path: Path, gemma_hf: Path) -> None:
    from click.testing import CliRunner

    from edge_annotator.train.cli import train as train_cmd

    cfg_path = tmp_path / "tiny.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"))
    cfg_path.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(train_cmd, [str(cfg_path), "--output", str(tmp_path / "run")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    import json

    prov = json.loads((tmp_path / "run" / "merged" / "provenance.json").read_text())
    assert prov["val_alpha"] > prov["val_alpha_untrained"]


def test_a_run_whose_examples_do_not_fit_stops_before_training(tmp_path: Path, gemma_hf: Path) -> None:
    """max_length 16 leaves nothing to learn from: one clear message, exit 1, within seconds, no adapter."""
    import time

    from click.testing import CliRunner

    from edge_annotator.train.cli import train as train_cmd

    cfg_path = tmp_path / "short.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp_path / "run"), max_length=16)
    cfg_path.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    r = CliRunner().invoke(train_cmd, [str(cfg_path)])
    assert r.exit_code == 1 and time.perf_counter() - t0 < 60
    import re

    # one line for all of them (the progress bar's line may precede it), the last thing printed
    lines = [ln for ln in r.output.strip().splitlines() if "max_length" in ln]
    assert len(lines) == 1 and r.output.strip().endswith(lines[0]), r.output
    assert re.search(r"(\d+) of \1 training examples are longer than max_length 16", lines[0]), r.output
    assert "the longest:" in lines[0] and "tokenizer" in lines[0]
    assert not (tmp_path / "run" / "best-adapter").exists()


def test_checkpoints_are_chosen_by_what_the_user_reads() -> None:
    """select_by score: the score's alpha for rating scales, the label's for label sets; label: the label's."""
    from edge_annotator.hf.score import selection_alpha

    scales = {"criteria": [{"alpha": -0.1, "score_alpha": 0.3}, {"alpha": 0.0, "score_alpha": 0.1}],
              "pooled": {"method": "all (item, criterion) units", "alpha": -0.05, "score_alpha": 0.2}}
    assert selection_alpha(scales, "score") == 0.2 and selection_alpha(scales, "label") == -0.05
    labels = {"criteria": [{"alpha": 0.4}], "pooled": {"method": "single criterion", "alpha": 0.4}}
    assert selection_alpha(labels, "score") == selection_alpha(labels, "label") == 0.4
    mixed = {"criteria": [{"alpha": 0.4}, {"alpha": -0.1, "score_alpha": 0.2}],
             "pooled": {"method": "mean over criteria (levels differ)", "alpha": 0.15}}
    assert selection_alpha(mixed, "score") == pytest.approx(0.3)
    undefined = {"criteria": [{"alpha": None}], "pooled": {"method": "single criterion", "alpha": None}}
    assert selection_alpha(undefined) == -1.0


def _dialogue_task(tmp_path: Path) -> tuple[Path, Path]:
    """A spec with a dialogue and a summary, four 1-5 criteria, and 24 items: four summaries of
    each of six dialogues (the shape of USR PersonaChat's five responses per conversation)."""
    levels = [{"value": v, "anchor": a} for v, a in zip(range(1, 6), ["poor", "weak", "fair", "good", "great"])]
    spec = {"name": "summaries", "inputs": [{"name": "dialogue", "title": "Dialogue"},
                                            {"name": "summary", "title": "Summary"}],
            "criteria": [{"name": n, "level": "ordinal", "scale": levels}
                         for n in ("Coherence", "Consistency", "Fluency", "Relevance")],
            "templates": ["Rate the summary of the dialogue.\n\n{rubric}"], "answer_cue": "{criterion} ({min}-{max}):"}
    spec_f = tmp_path / "summaries.yaml"
    spec_f.write_text(yaml.safe_dump(spec))
    base = load_items(DATA / "convabuse-train-300.jsonl", load_spec(TASKS / "convabuse.yaml"))
    rng = np.random.default_rng(0)
    rows = []
    for d in range(6):
        dialogue = " ".join(f"{it.fields['prev_user']} {it.fields['prev_agent']}" for it in base[12 * d:12 * d + 12])
        for k in range(4):
            rows.append({"id": f"d{d}-{k}", "dialogue": dialogue, "summary": base[100 + 4 * d + k].fields["user"],
                         "ratings": [{"rater": f"r{r}", "labels": {c["name"]: int(rng.integers(1, 6))
                                                                   for c in spec["criteria"]}} for r in range(3)]})
    import json

    data_f = tmp_path / "summaries.jsonl"
    data_f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return spec_f, data_f


def test_items_sharing_a_context_train_side_by_side_and_resume_exactly(tmp_path: Path, gemma_hf: Path) -> None:
    """Summaries of one dialogue come through the stream together and share a tree whose prefix
    holds the dialogue once: fewer tokens a step than the plain shuffle, every example seen once
    an epoch, and an interrupted run resumes to the very adapter an uninterrupted one trains."""
    from edge_annotator.train.recipe import augmentation
    from edge_annotator.train.trainer import Run, train

    spec_f, data_f = _dialogue_task(tmp_path)
    off = augmentation("none")
    kw = {"spec": str(spec_f), "train_data": str(data_f), "raters": "distribution", "augment": off, "max_steps": 4,
          "eval_every": 2, "patience": 10, "batch_size": 32, "micro_batch": 32, "val_max_items": 4,
          "max_length": 1024}

    def run(name: str, **more) -> Run:
        r = Run(tiny(tmp_path / name, gemma_hf, **(kw | more)))
        r.setup(False)
        return r

    grouped, plain = run("g"), run("p", share_contexts=False)
    assert grouped.stream.groups is not None and plain.stream.groups is None
    assert run("d", augment=off | {"token_dropout": {"prob": 0.1, "fraction": 0.5}}).stream.groups is None
    epoch = [j for _, j in grouped.stream.take(0, len(grouped.examples))]
    assert sorted(epoch) == list(range(len(grouped.examples)))
    keys = [grouped.data.train_items[grouped.examples[j].item].fields["dialogue"] for j in epoch]
    assert sum(a != b for a, b in zip(keys, keys[1:])) == len(set(keys)) - 1  # each dialogue's items together
    g_tokens = sum(t.tokens for s in range(4) for t in grouped.prepare(s).trees)
    p_tokens = sum(t.tokens for s in range(4) for t in plain.prepare(s).trees)
    assert g_tokens < 0.75 * p_tokens
    a = train(tiny(tmp_path / "a", gemma_hf, **kw))
    c_cfg = tiny(tmp_path / "c", gemma_hf, **kw)
    train(c_cfg, stop_after=3)
    c = train(c_cfg, resume=True)
    ta, tc = _adapter(a.output), _adapter(c.output)
    assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tc[k]) for k in ta)
