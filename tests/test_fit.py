"""annotate-cli fit: a CSV of human ratings to a parity-checked GGUF and a report, in one command;
train --check; and README's quickstart run as written (train/fit.py, train/check.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.gguf_file import sha256_file

pytestmark = pytest.mark.slow


def _fit(*args: str):
    return CliRunner().invoke(cli, ["fit", *args], catch_exceptions=False)


@pytest.mark.full  # fit's stages run in make test on the tiny model (the quickstart below) and the head route
def test_fit_with_gemma_on_a_few_hundred_sentences(tmp_path: Path, gemma_hf: Path) -> None:
    """Gemma 3 270M itself, 400 EmoBank sentences: a budget too small to train is refused with the
    budget that would do; two minutes then run the same stages end to end (--resume keeps the
    split), and the annotator it publishes scores the test items (its alpha is what two minutes of
    training buy: not asserted)."""
    out = tmp_path / "emo.gguf"
    args = [str(TASKS / "emobank.yaml"), str(DATA / "emobank-train-400.jsonl"), "-o", str(out), "--base",
            str(gemma_hf), "--threads", "2"]
    r = CliRunner().invoke(cli, ["fit", *args, "--budget", "30s"])
    assert r.exit_code == 1 and "fewer than 10 training steps" in r.output and "give --budget" in r.output, r.output
    assert not (tmp_path / "emo.run" / "config.yaml").exists()
    r = _fit(*args, "--budget", "2m", "--resume")
    assert r.exit_code == 0, r.output
    state = json.loads((tmp_path / "emo.run" / "fit.json").read_text())
    assert state["parity"]["pass"] and state["split"]["test"]["items"] == 80
    assert state["estimate"]["steps"] >= 10 and state["estimate"]["estimate_s"] <= 120  # cut to the budget
    assert set(state["test"]["criteria"]) == {"Valence", "Arousal", "Dominance"}
    assert "test Valence: score alpha" in r.stderr


def test_train_check_validates_and_estimates_without_training(tmp_path: Path, gemma_hf: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp_path / "run"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(cli, ["train", str(cfg), "--check"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "valid;" in r.stderr and "s a step" in r.stderr and "estimated" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    assert "once the frozen layers are kept" not in r.stderr
    raw["lora"] = {**raw["lora"], "layers": [1]}  # the top layer of two: the bottom one is kept
    raw["augment"] = {"templates": False, "permute_inputs": False, "shuffle_labels": False}  # prompts that repeat
    cfg.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(cli, ["train", str(cfg), "--check"], catch_exceptions=False)
    assert r.exit_code == 0 and "once the frozen layers are kept" in " ".join(r.stderr.split()), r.output
    raw["max_length"] = 64
    cfg.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(cli, ["train", str(cfg), "--check"])
    assert r.exit_code == 1 and "longer than max_length 64" in r.output


def test_readme_quickstart_runs_as_written_and_ends_with_a_report(tmp_path: Path, gemma_path: Path,
                                                                  gemma_hf: Path) -> None:
    """README's quickstart block, line by line in a fresh folder with the repository's data and tasks,
    the one change being `--tiny` on the fit line (a 2-layer model built from scratch: CI's time). The
    base model already made is linked in, so `annotate-cli base` finds it. Then what fit left: the
    shipped ratings CSV (300 ConvAbuse items, one row per rating) split by item, a recipe, training,
    export, parity on the validation items, the test report with the leave-one-rater-out figures,
    every choice in fit.json and in the file's provenance; --resume redoes nothing, and a second fit
    without it is refused."""
    block = re.search(r"<!-- begin quickstart -->\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has a quickstart block"
    lines = block.group(1).replace("\\\n", " ").strip().splitlines()
    work = tmp_path / "work"
    work.mkdir()
    for d in ("data", "tasks"):
        shutil.copytree(ROOT / d, work / d)
    (work / "models").mkdir()
    os.symlink(gemma_path, work / "models" / gemma_path.name)
    os.symlink(gemma_hf, work / "models" / "gemma-3-270m-hf")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    fit_line = None
    for line in lines:
        cmd = line.split("#")[0].strip()
        if cmd.startswith("annotate-cli fit"):
            cmd = fit_line = cmd + " --tiny"
        r = subprocess.run(cmd, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
        if cmd == fit_line:
            for stage in ("split", "recipe", "train", "export", "parity", "test", "trust"):
                assert f"{stage}:" in r.stderr, stage
            assert "trust severity: at most 10% disagreement" in r.stderr, r.stderr[-3000:]
    assert fit_line is not None
    run = work / "convabuse.run"
    state = json.loads((run / "fit.json").read_text())
    sizes = state["split"]
    # the report says how the annotator was trained: the steps made and the passes they made
    trained = json.loads((run / "report" / "report.json").read_text())["training"]
    assert trained["items"] == 210 and trained["steps"] == state["train"]["steps"] > 0
    assert trained["planned_steps"] == state["estimate"]["steps"] >= trained["steps"]
    # one criterion (severity): a step's examples are its items
    assert trained["passes"] == pytest.approx(trained["steps"] * state["recipe"]["batch_size"] / 210, abs=0.02)
    assert "passes over the training items" in (run / "report" / "report.html").read_text()
    assert [sizes[k]["items"] for k in ("train", "val", "test")] == [210, 30, 60]
    assert {"max_steps", "epochs", "lr", "max_length", "augment"} <= set(state["recipe"])
    assert state["estimate"]["step_s"] > 0 and state["parity"]["pass"] is True
    agree = json.loads((run / "agree.json").read_text())
    assert agree["items_with_humans"] == 60 and "leave_one_out" in agree["criteria"][0]
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(work / "convabuse.gguf"), "--json", "--no-hash"]).stdout)
    assert info["provenance"]["fit"]["split"] == sizes and info["provenance"]["fit"]["recipe"]["max_steps"]
    # the trust rule, fitted on the 60 test items, is in the published file and its manifest names it
    rule = state["trust"]["criteria"]["severity"]
    assert rule["items"] == 60 and info["spec"]["criteria"][0]["trust"] == rule
    manifest = json.loads((work / "convabuse.gguf.manifest.json").read_text())
    assert manifest["sha256"] == state["trust"]["sha256"] == sha256_file(work / "convabuse.gguf")
    labels = [json.loads(x) for x in (work / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 50 and all(set(x["accept"]) == {"severity"} for x in labels)
    review = [json.loads(x)["id"] for x in (work / "review.jsonl").read_text().splitlines()]
    assert set(review) == {x["id"] for x in labels if not x["accept"]["severity"]}
    tasks = json.loads((work / "tasks.json").read_text())
    assert len(tasks) == 50 and "<Choices" in (work / "config.xml").read_text()
    log_mtime = (run / "train" / "log.jsonl").stat().st_mtime_ns
    r = subprocess.run(fit_line + " --resume", shell=True, cwd=work, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0 and "train:" not in r.stderr, r.stderr[-3000:]
    assert (run / "train" / "log.jsonl").stat().st_mtime_ns == log_mtime
    assert sha256_file(work / "convabuse.gguf") == state["trust"]["sha256"]
    r = subprocess.run(fit_line, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "holds an earlier fit; pass --resume" in r.stderr
    # what parity's failure message advises: --resume at a wider type exports again, and every stage
    # after the export (parity, the test report, the trust rule) follows the new file; no training
    r = subprocess.run(fit_line + " --resume --quant Q8_0", shell=True, cwd=work, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0 and "Q4_K_M -> Q8_0: exporting again" in r.stderr, r.stderr[-3000:]
    assert "train:" not in r.stderr and all(f"{s}:" in r.stderr for s in ("parity", "test", "trust"))
    again = json.loads((run / "fit.json").read_text())
    assert again["export"]["quant"] == "Q8_0" and again["parity"]["pass"] is True
    assert again["trust"]["sha256"] != state["trust"]["sha256"]
    assert sha256_file(work / "convabuse.gguf") == again["trust"]["sha256"]
    assert json.loads((work / "convabuse.gguf.manifest.json").read_text())["sha256"] == again["trust"]["sha256"]


def test_fit_route_head_trains_nothing_and_publishes_a_tested_annotator_in_minutes(tmp_path: Path,
                                                                                   gemma_hf: Path) -> None:
    """--route head: the split, then a head per criterion on the base GGUF's states for the train and
    validation items, then the test and its report; no recipe, training or export stage runs, and
    the published file is the base with the heads in its spec."""
    from edge_annotator.runtime.gguf_meta import read_model_info

    out = tmp_path / "emo-head.gguf"
    r = _fit(str(TASKS / "emobank.yaml"), str(DATA / "emobank-train-400.jsonl"), "-o", str(out), "--base",
             str(gemma_hf), "--threads", "2", "--route", "head")
    assert r.exit_code == 0, r.output
    run = tmp_path / "emo-head.run"
    state = json.loads((run / "fit.json").read_text())
    assert state["heads"]["items"] == 320 and set(state["heads"]["criteria"]) == {"Valence", "Arousal", "Dominance"}
    assert not any((run / x).exists() for x in ("config.yaml", "train", "parity.json"))
    assert (run / "report" / "report.json").is_file() and set(state["test"]["criteria"]) == {"Valence", "Arousal",
                                                                                             "Dominance"}
    spec = read_model_info(out).spec
    assert spec is not None and all(c.head for c in spec.criteria)
    assert "head Valence:" in r.stderr and "heads fitted" in r.stderr
