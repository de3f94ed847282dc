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
    labels = tmp_path / "emobank-200.jsonl"  # CI's time: 160 items read for the heads, 40 tested
    labels.write_text("".join((DATA / "emobank-train-400.jsonl").read_text().splitlines(keepends=True)[:200]))
    r = _fit(str(TASKS / "emobank.yaml"), str(labels), "-o", str(out), "--base",
             str(gemma_hf), "--threads", "2", "--route", "head")
    assert r.exit_code == 0, r.output
    run = tmp_path / "emo-head.run"
    state = json.loads((run / "fit.json").read_text())
    assert state["heads"]["items"] == 160 and set(state["heads"]["criteria"]) == {"Valence", "Arousal", "Dominance"}
    assert not any((run / x).exists() for x in ("config.yaml", "train", "parity.json"))
    assert (run / "report" / "report.json").is_file() and set(state["test"]["criteria"]) == {"Valence", "Arousal",
                                                                                             "Dominance"}
    spec = read_model_info(out).spec
    assert spec is not None and all(c.head for c in spec.criteria)
    assert "head Valence:" in r.stderr and "heads fitted" in r.stderr


def test_fit_route_auto_publishes_the_heads_before_training_and_ends_on_the_better(tmp_path: Path,
                                                                                 gemma_hf: Path) -> None:
    """--route auto: the heads' annotator is OUT before the recipe stage (a first annotator minutes
    in), then the fine-tune trains, exports and passes parity, and OUT ends as the heads' file where
    their gain in alpha over the fine-tune on the validation items has an interval above 0, else the
    fine-tune's: the heads' records there are from heads fitted on the training items alone,
    computed from their states as annotate computes them (checked against annotate on the
    validation items), and the gain is recomputed from both sides' records. --tiny: a 2-layer
    fine-tune (CI's time)."""
    from edge_annotator.export.heads import context_groups, scores_of, states_of
    from edge_annotator.hf.quant_grid import gguf_of
    from edge_annotator.runtime.gguf_meta import read_model_info
    from edge_annotator.runtime.jobs import JobOptions, annotate_file
    from edge_annotator.runtime.labels import read_labelled
    from edge_annotator.runtime.records import read_predictions
    from edge_annotator.runtime.spec import load_spec
    from edge_annotator.train.fit import FitOptions, fit, route_gain

    out = tmp_path / "abuse.gguf"
    seen: list[tuple[str, bool]] = []

    def stage(name: str, what: str) -> None:
        if out.exists():
            info = read_model_info(out)
            seen.append((name, info.spec is not None and all(c.head for c in info.spec.criteria)))
        else:
            seen.append((name, False))

    opts = FitOptions(base=str(gemma_hf), budget_s=60, threads=2, route="auto", tiny=True)
    state = fit(TASKS / "convabuse.yaml", DATA / "convabuse-ratings-300.csv", out, opts, stage=stage)
    names = [n for n, _ in seen]
    assert names.index("heads") < names.index("recipe") < names.index("train") < names.index("route")
    assert dict(seen)["recipe"] is True, "OUT is the heads' annotator before training starts"
    run = tmp_path / "abuse.run"
    route, val = state["route"], state["heads"]["val"]
    assert val["items"] == state["split"]["val"]["items"] == route["items"] == 30 and val["fitted_on"] == 210
    lo, hi = route["ci95"]
    assert lo <= route["gain"] <= hi and route["gain"] == pytest.approx(route["head"] - route["lora"])
    assert route["chose"] == ("head" if lo > 0 else "lora")
    # the tiny fine-tune learns next to nothing: the heads on Gemma's states are clearly better
    assert route["chose"] == "head", route
    spec0 = load_spec(TASKS / "convabuse.yaml")
    val_all = [it for it in read_labelled(run / "split" / "val.jsonl", spec0, strict=False).items if it.ratings]
    heads_val, lora_val = (read_predictions(run / f, spec0, need_probs=False) for f in ("heads-val.jsonl",
                                                                                        "lora-val.jsonl"))
    again = route_gain(spec0, val_all, heads_val, lora_val, context_groups(spec0, val_all), "score")
    assert again == {k: route[k] for k in again}
    # --resume redoes the route stage alone where its record is gone (the fine-tune's validation
    # records continued, not rewritten) and comes to the same choice; nothing else runs again
    st = json.loads((run / "fit.json").read_text())
    del st["route"]
    (run / "fit.json").write_text(json.dumps(st))
    seen.clear()
    resumed = fit(TASKS / "convabuse.yaml", DATA / "convabuse-ratings-300.csv", out, opts, resume=True, stage=stage)
    assert resumed["route"] == route and {n for n, _ in seen} == {"route"}, seen
    assert sha256_file(out) == state["trust"]["sha256"]
    assert state["parity"]["pass"] is True and (run / "report" / "report.json").is_file()
    # parity reads the split's one row per rater as one item with its raters: 30, not each row
    assert state["parity"]["humans"]["items"] == 30
    chosen = run / ("head.gguf" if route["chose"] == "head" else "annotator.gguf")
    assert state["trust"]["sha256"] == sha256_file(out) and sha256_file(chosen) != sha256_file(out)  # + the rule
    spec = read_model_info(out).spec
    assert spec is not None and all(bool(c.head) == (route["chose"] == "head") for c in spec.criteria)
    trained = json.loads((run / "report" / "report.json").read_text()).get("training")
    assert (trained is None) == (route["chose"] == "head")
    # what the heads' validation figure rests on: scores from states equal annotate's records
    head_spec = read_model_info(run / "head.gguf").spec
    val_items = val_all[:8]
    base = gguf_of(str(gemma_hf))
    assert head_spec is not None and base is not None
    by_states = scores_of(head_spec, states_of(base, head_spec, val_items, threads=2))
    items_f = tmp_path / "val8.jsonl"
    items_f.write_text("".join(json.dumps({"id": it.id, **it.fields}) + "\n" for it in val_items))
    annotate_file(run / "head.gguf", items_f, str(tmp_path / "val8-pred.jsonl"), JobOptions(threads=2))
    records = read_predictions(tmp_path / "val8-pred.jsonl", head_spec)
    for rec, mine in zip(records, by_states):
        assert {k: v.label for k, v in mine.items()} == rec.labels
        assert {k: pytest.approx(v.score, abs=1e-6) for k, v in mine.items()} == rec.scores
