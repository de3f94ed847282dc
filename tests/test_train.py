"""The training stage: configs, examples, the answer-only loss, determinism, resume, merge.

Runs on the tiny recipe (a 2-layer model built from scratch with Gemma 3's tokenizer, CPU, fp32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.prompt import prompt_segments, render_prompt
from edge_annotator.runtime.spec import load_spec
from edge_annotator.train.config import Augment, ConfigError, TokenDropout, TrainConfig, load_config, parse_config
from edge_annotator.train.examples import Example, build_examples, load_items, render, split_items

pytestmark = pytest.mark.slow
EMO = load_spec(TASKS / "emobank.yaml")
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def tiny(tmp_path: Path, gemma_hf: Path, **kw) -> TrainConfig:
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp_path / "run"))
    raw.update(kw)
    return parse_config(raw, "tiny-test")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path: Path) -> None:
    cfg = load_config(path, check_paths=False)
    assert (ROOT / cfg.spec).is_file()
    # names say model, method and device
    assert cfg.quantization == ("nf4" if "qlora" in path.stem else "none")
    assert {"cpu": "cpu", "cuda": "gpu"}.get(cfg.device, "") in path.stem.split("-")


def test_the_published_recipe() -> None:
    cfg = load_config(ROOT / "configs" / "qwen3-1.7b-qlora-gpu-qa-rubric.yaml", check_paths=False)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lr, cfg.epochs, cfg.batch_size) == (16, 32, 5e-5, 5, 32)
    assert (cfg.schedule, cfg.warmup_ratio, cfg.quantization, cfg.compute_dtype) == ("linear", 0.05, "nf4", "bfloat16")
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_config_problems_are_listed_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"base_model": "nowhere", "spec": "x.yaml", "lr": -1, "batch_size": 10, "micro_batch": 3,
                      "bogus": 1, "quantization": "int3"}, "bad.yaml")
    msg = str(e.value)
    for needle in ("train_data: required", "output: required", "bogus: unknown key", "quantization: must be one of"):
        assert needle in msg, msg


def test_training_text_is_the_runtime_prompt_plus_the_answer(gemma_hf: Path, engine) -> None:
    from edge_annotator.train.model import load_tokenizer

    tok = load_tokenizer(gemma_hf)
    items = load_items(DATA / "emobank-train-64.jsonl", EMO)
    ex = Example(0, 1, 4)
    enc = render(ex, items, EMO, tok, None, np.random.default_rng(0))
    prompt = render_prompt(EMO, items[0].fields, EMO.criteria[1])
    n = len(tok(prompt)["input_ids"])
    assert enc.input_ids[:n] == tok(prompt)["input_ids"]
    assert tok.decode(enc.input_ids[n:]) == " 4" and enc.labels[:n] == [-100] * n
    # the HF tokenizer and llama.cpp's give the same prompt tokens
    assert enc.input_ids[:n] == engine.tokenize(prompt)


def test_split_is_by_item_and_raters_modes(tmp_path: Path) -> None:
    items = load_items(DATA / "emobank-train-64.jsonl", EMO)
    tr, va = split_items(items, 0.25, seed=0)
    assert not {i.id for i in tr} & {i.id for i in va} and len(tr) + len(va) == len(items) == 64
    each = build_examples(tr, EMO, "each")
    med = build_examples(tr, EMO, "median")
    assert len(med) == 3 * len(tr)
    assert len(each) == 3 * sum(len(i.ratings) for i in tr)


def test_token_dropout_only_touches_the_item_text(gemma_hf: Path) -> None:
    from edge_annotator.train.model import load_tokenizer

    tok = load_tokenizer(gemma_hf)
    items = load_items(DATA / "emobank-train-64.jsonl", EMO)
    aug = Augment(templates=False, permute_inputs=False, shuffle_labels=False,
                  token_dropout=TokenDropout(prob=0.5, fraction=1.0))
    clean = render(Example(3, 0, 3), items, EMO, tok, None, np.random.default_rng(1))
    dropped = render(Example(3, 0, 3), items, EMO, tok, aug, np.random.default_rng(1))
    instr, inputs, _ = prompt_segments(EMO, items[3].fields, EMO.criteria[0])
    lo, hi = len(tok(instr)["input_ids"]), len(tok(instr + inputs)["input_ids"])
    diff = [k for k, (a, b) in enumerate(zip(clean.input_ids, dropped.input_ids)) if a != b]
    assert diff and all(lo <= k < hi for k in diff)
    assert all(dropped.input_ids[k] == tok.pad_token_id for k in diff)
    assert dropped.labels == clean.labels


def test_answer_only_logits_equal_the_full_forward(tmp_path: Path, gemma_hf: Path) -> None:
    from edge_annotator.train.model import add_lora, answer_logits, build_tiny

    cfg = tiny(tmp_path, gemma_hf)
    model = add_lora(build_tiny(cfg), cfg).eval()
    ids = torch.randint(5, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([3, 11, 8])
    torch.testing.assert_close(answer_logits(model, ids, mask, rows, cols),
                               answer_logits(model, ids, mask, rows, cols, answer_only=False))


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
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
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
