"""Training configs (train/config.py): the shipped recipes, the typed loader, and its errors.

The loader reads the dataclass annotations; every problem in a file comes back at once as one
ConfigError, and `annotate-cli train` prints it in one message, exit 1, no traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.errors import UserError
from edge_annotator.train.cli import train as train_cmd
from edge_annotator.train.config import ConfigError, load_config, parse_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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


def test_the_small_data_recipe_is_a_valid_config_cut_to_the_budget() -> None:
    from edge_annotator.train.check import estimate_seconds
    from edge_annotator.train.recipe import BudgetTooSmall, fit_to_budget, small_data_config

    raw = small_data_config(str(TASKS / "emobank.yaml"), "t.jsonl", "v.jsonl", "base", "out", items=300, criteria=3,
                            longest=277)
    cfg = parse_config(raw, "recipe", check_paths=False)
    # 16 short items a tree (x 3 criteria), 12 passes over a few hundred items, max_length from the longest
    assert (cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.max_length) == (48, 12, 12 * 19, 320)

    def cost(r: dict) -> float:
        return estimate_seconds(r["max_steps"], r["eval_every"], 3.3, 4.8, True)

    cut = fit_to_budget(raw, 3.3, 4.8, 600)
    assert 10 < cut["max_steps"] < raw["max_steps"] and cost(cut) <= 600
    more = fit_to_budget(raw, 3.3, 4.8, 600 + 3.3 + 4.8)
    assert more["max_steps"] > cut["max_steps"]  # the budget is spent, not left over
    assert fit_to_budget(raw, 3.3, 4.8, 10**6)["max_steps"] == raw["max_steps"]  # never beyond the epoch cap
    with pytest.raises(BudgetTooSmall, match=r"give --budget (\d+)s") as e:
        fit_to_budget(raw, 3.3, 4.8, 60)
    enough = int(e.value.args[0].rsplit("--budget ", 1)[1].split("s")[0])
    assert fit_to_budget(raw, 3.3, 4.8, enough)["max_steps"] >= 10
    # the frozen layers kept: the first pass's steps at 3.3 s, the later ones at 1.1 s buy more steps
    kept = fit_to_budget(raw, 3.3, 4.8, 600, repeat_s=1.1, pass_steps=19)
    assert kept["max_steps"] > cut["max_steps"] + 19
    assert estimate_seconds(kept["max_steps"], kept["eval_every"], 3.3, 4.8, True, 1.1, 19) <= 600
    assert estimate_seconds(30, 10, 3.3, 0.0, False, 1.1, 19) == pytest.approx(19 * 3.3 + 11 * 1.1 + 15.0)
    assert estimate_seconds(10, 10, 3.3, 0.0, False, 1.1, 19) == estimate_seconds(10, 10, 3.3, 0.0, False)
    # long three-field items, five sharing each context: a step takes whole contexts (8 -> 10 items)
    usr = {"items": 210, "criteria": 6, "longest": 500}
    assert small_data_config("s", "t", "v", "b", "o", **usr)["batch_size"] == 8 * 6
    grouped = small_data_config("s", "t", "v", "b", "o", **usr, context=5)
    assert (grouped["batch_size"], grouped["share_contexts"]) == (10 * 6, True)


def test_the_small_data_recipe_names_each_augmentation() -> None:
    from edge_annotator.train.recipe import AUGMENTATIONS, small_data_config

    def augment(name: str) -> Any:
        raw = small_data_config(str(TASKS / "emobank.yaml"), "t.jsonl", "v.jsonl", "base", "out", items=300,
                                criteria=3, longest=277, augment=name)
        return parse_config(raw, "recipe", check_paths=False).augment

    on = {name: augment(name) for name in AUGMENTATIONS}
    assert not any((on["none"].templates, on["none"].permute_inputs, on["none"].token_dropout.prob))
    assert on["all"].templates and on["all"].permute_inputs and on["all"].token_dropout.prob > 0
    # each alone turns on its own part and nothing else
    assert (on["templates"].templates, on["templates"].permute_inputs, on["templates"].token_dropout.prob) == \
        (True, False, 0.0)
    assert (on["permute"].templates, on["permute"].permute_inputs, on["permute"].token_dropout.prob) == \
        (False, True, 0.0)
    assert (on["dropout"].templates, on["dropout"].permute_inputs, on["dropout"].token_dropout.prob) == \
        (False, False, 0.1)
    with pytest.raises(UserError, match="'some' is none of none, all, templates"):
        augment("some")


def test_config_problems_are_listed_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"base_model": "nowhere", "spec": "x.yaml", "lr": -1, "batch_size": 10, "micro_batch": 3,
                      "bogus": 1, "quantization": "int3"}, "bad.yaml")
    msg = str(e.value)
    for needle in ("train_data: required", "output: required", "bogus: unknown key", "quantization: must be one of"):
        assert needle in msg, msg


def _tiny_yaml(tmp_path: Path, gemma_hf: Path, extra: str) -> Path:
    """The tiny recipe as a YAML file with `extra` lines appended as written (YAML 1.1 typing applies)."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp_path / "run"))
    for key in yaml.safe_load(extra):
        raw.pop(key, None)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw) + extra)
    return p


@pytest.mark.slow
def test_a_float_yaml_reads_as_text_trains_as_the_number_meant(tmp_path: Path, gemma_hf: Path) -> None:
    """PyYAML reads `lr: 5e-5` (no decimal point) as the string '5e-5'; the loader reads the field's
    annotation and takes it as 5e-05, and the run trains."""
    p = _tiny_yaml(tmp_path, gemma_hf, "lr: 5e-5\nbatch_size: 8\nmicro_batch: 8\n")
    assert yaml.safe_load(p.read_text())["lr"] == "5e-5"
    assert load_config(p).lr == 5e-5
    r = CliRunner().invoke(train_cmd, [str(p), "--max-steps", "2", "--no-merge"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "best-adapter").is_dir()


@pytest.mark.slow
def test_wrong_types_and_unknown_keys_are_one_config_error(tmp_path: Path, gemma_hf: Path) -> None:
    p = _tiny_yaml(tmp_path, gemma_hf, 'lr: fast\nbatch_size: "32"\nmicro_batch: 8\nlearning_rate: 0.1\n'
                                       'lora: {r: 8, layers: [1, top]}\naugment: {templates: maybe}\n')
    r = CliRunner().invoke(train_cmd, [str(p)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "invalid training config (5 problem(s))" in r.output, r.output
    for needle in ("lr: expected a number, got 'fast'", "batch_size: expected a whole number, got '32'",
                   "learning_rate: unknown key", "lora.layers[1]: expected a whole number, got 'top'",
                   "augment.templates: expected true or false, got 'maybe'"):
        assert needle in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_top_layers_names_the_upper_layers_and_refuses_a_count_out_of_range(tmp_path: Path) -> None:
    """fit --top-layers and scripts/demo.py --top-layers: the layer count from the base's config.json
    (or the caller's, for a tiny model), one line naming the range otherwise."""
    from edge_annotator.train.config import top_layers

    (tmp_path / "config.json").write_text('{"num_hidden_layers": 18}')
    assert top_layers(tmp_path, 9) == list(range(9, 18))
    assert top_layers("tiny", 1, 2) == [1]
    for k in (0, 18):
        with pytest.raises(ValueError, match="has 18 layers; give 1 to 17"):
            top_layers(tmp_path, k)
