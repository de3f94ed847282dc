"""Each part installed alone into a fresh virtualenv runs its own commands: `--help` and one real
call each (the export extra's own test: test_export.py::test_the_export_extra_alone_runs_export_and_parity).

    pip install edge-annotator             annotate, agree, convert, inspect, embed-spec, head; no torch
    pip install 'edge-annotator[report]'   + agree --report
    pip install 'edge-annotator[train]'    + train (and merge), from-gguf
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import DATA, ROOT, TASKS
from test_packaging import install_alone, wheel_links

pytestmark = pytest.mark.slow
ITEMS = DATA / "emobank-test-50.jsonl"


def _run(bin_: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_ / "annotate-cli"), *args], capture_output=True, text=True, timeout=900, cwd=cwd)


def _commands(bin_: Path, cwd: Path) -> dict[str, str]:
    """annotate-cli --help's commands: name -> its one-line help."""
    out = _run(bin_, "--help", cwd=cwd).stdout
    return {ln.split()[0]: ln.split(None, 1)[1] for ln in out.split("Commands:", 1)[1].splitlines() if ln.strip()}


def test_the_runtime_alone_annotates_and_the_report_extra_adds_the_report(tmp_path: Path, gemma_path: Path) -> None:
    bin_ = install_alone(tmp_path)
    for mod in ("torch", "transformers", "matplotlib"):
        r = subprocess.run([str(bin_ / "python"), "-c", f"import {mod}"], capture_output=True, text=True)
        assert r.returncode != 0, f"{mod} is in the runtime-only environment"
    cmds = _commands(bin_, tmp_path)
    absent = {k for k, v in cmds.items() if "not installed" in v}
    runtime_only = {"annotate", "agree", "convert", "inspect", "embed-spec", "data", "doctor", "select", "head",
                    "trust"}
    assert set(cmds) - absent == runtime_only, cmds
    assert absent == {"train", "export", "parity", "bench", "from-gguf", "fit", "base", "serve"}, cmds
    assert "pip install 'edge-annotator[train]'" in cmds["train"]
    r = _run(bin_, "train", "configs/tiny-lora-cpu.yaml", "--max-steps", "2", cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "annotate-cli train is not installed here" in r.stderr and "edge-annotator[train]" in r.stderr, r.stderr
    few = tmp_path / "few.jsonl"
    few.write_text("".join(ITEMS.read_text().splitlines(keepends=True)[:8]))
    pred = tmp_path / "pred.jsonl"
    r = _run(bin_, "annotate", str(gemma_path), str(few), "--spec", str(TASKS / "emobank.yaml"), "-o", str(pred),
             cwd=tmp_path)
    assert r.returncode == 0 and len(pred.read_text().splitlines()) == 8, r.stderr[-3000:]
    r = _run(bin_, "agree", str(pred), str(few), "--spec", str(TASKS / "emobank.yaml"), "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["items_with_humans"] == 8, r.stderr[-3000:]
    # the head route needs no torch either: numpy on the GGUF's own states
    few12 = tmp_path / "few12.jsonl"
    few12.write_text("".join(ITEMS.read_text().splitlines(keepends=True)[:12]))
    r = _run(bin_, "head", str(gemma_path), str(few12), "--spec", str(TASKS / "emobank.yaml"), "-o",
             str(tmp_path / "head.gguf"), "--threads", "2", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "head.gguf").is_file(), r.stderr[-3000:]
    report = ["agree", str(pred), str(few), "--spec", str(TASKS / "emobank.yaml"), "--report", str(tmp_path / "rep")]
    r = _run(bin_, *report, cwd=tmp_path)
    assert r.returncode == 1 and "pip install 'edge-annotator[report]'" in r.stderr, r.stderr[-3000:]

    src = tmp_path / "src"  # install_alone's copy of the checkout
    r = subprocess.run([str(bin_ / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), *wheel_links(),
                        f"{src}[report]"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(bin_, *report, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and (tmp_path / "rep" / "report.json").is_file()


@pytest.mark.full  # a fresh virtualenv with torch; make test trains and merges in the project's own
def test_the_train_extra_alone_trains_and_merges(tmp_path: Path, gemma_hf: Path) -> None:
    bin_ = install_alone(tmp_path, "train")
    r = subprocess.run([str(bin_ / "python"), "-c", "import matplotlib"], capture_output=True, text=True)
    assert r.returncode != 0, "the report extra's matplotlib is in the train-only environment"
    cmds = _commands(bin_, tmp_path)
    # train's packages cover export's; serve (fastapi, uvicorn) is an extra of its own
    assert [k for k, v in cmds.items() if "not installed" in v] == ["serve"], cmds
    for cmd in ("train", "from-gguf"):
        r = _run(bin_, cmd, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "Examples:" in r.stdout, (cmd, r.stderr[-2000:])
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp_path / "run"))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = _run(bin_, "train", str(cfg), "--max-steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = tmp_path / "run" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "spec.json").is_file()
    assert json.loads((tmp_path / "run" / "timing.json").read_text())["steps"] == 2
