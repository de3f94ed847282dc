"""The HF tokenizer is checked against the GGUF's vocabulary where a base is made and where it is used.

A tokenizer that differs is made for real: Gemma 3's tokenizer.json with its BPE merges removed
(every word then falls apart into characters, as transformers 5.17's conversion made a 19-token
sentence 96 tokens)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

pytestmark = pytest.mark.slow


def _broken_copy(src: Path, dst: Path) -> Path:
    """src's config, weights (linked) and fingerprint, with a tokenizer.json that has no merges."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (dst / f.name).symlink_to(f.resolve())
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["model"]["merges"] = []
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_the_converted_tokenizer_matches_llama_cpp_and_its_fingerprint_is_written(gemma_hf: Path,
                                                                                    gemma_path: Path) -> None:
    from transformers import AutoTokenizer

    from edge_annotator.hf.tokcheck import FINGERPRINT, check_against_gguf, check_folder, probe_texts

    fp = check_against_gguf(AutoTokenizer.from_pretrained(gemma_hf), gemma_path)
    # the sentence transformers 5.17 split into 96 tokens is 19 for llama.cpp; every shipped spec's prompts
    assert len(fp["ids"][0]) == 19 and len(fp["texts"]) == len(probe_texts()) > 8
    assert (gemma_hf / FINGERPRINT).is_file()  # from_gguf wrote it when the folder was made
    assert check_folder(gemma_hf, AutoTokenizer.from_pretrained(gemma_hf)) is None


def test_from_gguf_refuses_a_tokenizer_that_splits_differently(gemma_hf: Path, gemma_path: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion's tokenizer is replaced by the merge-less one (this transformers converts
    Gemma correctly; 5.17 does not, and is not installable here): one line, exit 1, nothing written."""
    import transformers

    from edge_annotator.train import from_gguf

    broken = transformers.AutoTokenizer.from_pretrained(_broken_copy(gemma_hf, tmp_path / "broken"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: broken)
    out = tmp_path / "hf"
    r = CliRunner().invoke(from_gguf.from_gguf, [str(gemma_path), str(out)])
    err = r.output.strip().splitlines()
    assert r.exit_code == 1, r.output
    assert len(err) == 1 and "splits" in err[0] and "differently from llama.cpp" in err[0], err
    assert not out.exists() and not (tmp_path / "hf.partial").exists()


def test_from_gguf_refuses_a_tokenizer_folder_that_is_not_the_model_s(gemma_hf: Path, gemma_path: Path,
                                                                     tmp_path: Path) -> None:
    from edge_annotator.train import from_gguf

    out = tmp_path / "hf"
    broken = _broken_copy(gemma_hf, tmp_path / "broken")
    r = CliRunner().invoke(from_gguf.from_gguf, [str(gemma_path), str(out), "--tokenizer", str(broken)])
    err = r.output.strip().splitlines()
    assert r.exit_code == 1, r.output
    assert len(err) == 1 and f"from {broken} splits" in err[0] and "not this model's tokenizer" in err[0], err
    assert not out.exists()


def test_without_llama_cpp_a_recorded_fingerprint_refuses_a_changed_tokenizer_or_another_gguf(
        gemma_hf: Path, gemma_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from edge_annotator.hf.tokcheck import FINGERPRINT
    from edge_annotator.train import from_gguf

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not importable: as where it is not installed
    broken = _broken_copy(gemma_hf, tmp_path / "broken")
    r = CliRunner().invoke(from_gguf.from_gguf, [str(gemma_path), str(tmp_path / "hf"), "--tokenizer", str(broken)])
    err = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(err) == 1 and "differently from" in err[0], r.output
    other = tmp_path / "other"
    other.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", FINGERPRINT):
        shutil.copy(gemma_hf / f, other / f)
    rec = json.loads((other / FINGERPRINT).read_text())
    (other / FINGERPRINT).write_text(json.dumps(rec | {"gguf": "another.gguf"}))
    r = CliRunner().invoke(from_gguf.from_gguf, [str(gemma_path), str(tmp_path / "hf"), "--tokenizer", str(other)])
    assert r.exit_code == 1 and "not gemma-3-270m-q4_k_m.gguf" in r.output, r.output
    assert not (tmp_path / "hf").exists()


def test_training_stops_before_step_1_on_a_tokenizer_changed_since_conversion(gemma_hf: Path, tmp_path: Path) -> None:
    from edge_annotator.train.cli import train as train_cmd

    base = _broken_copy(gemma_hf, tmp_path / "base")
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(base), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp_path / "run"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(train_cmd, [str(cfg)])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.strip().splitlines() if "tokenizer" in ln]
    assert len(lines) == 1 and "differently from" in lines[0] and "from_gguf" in lines[0], r.output
    assert not (tmp_path / "run" / "best-adapter").exists() and not (tmp_path / "run" / "log.jsonl").exists()
