"""The bases users bring, end to end: tiny Qwen3 (tied and untied output layer, q/k norms) and
Llama 3 (llama3 rope_scaling, untied), both with grouped-query attention, built in code with a
SentencePiece tokenizer trained here (train/tiny.py says why). Each: token-tree gradients equal the
unshared path; train, merge, export at F16, Q8_0 and Q4_K_M with the adapted tensors kept by name;
parity passes; annotate gives the HF model's labels, byte-identical across threads and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.cli import cli

pytestmark = pytest.mark.slow
CASES = {"qwen3-tied": ("qwen3", True), "qwen3": ("qwen3", False), "llama3": ("llama3", False)}


@pytest.fixture(scope="module", params=sorted(CASES))
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base folder, trained and merged run, and its exports, per architecture.

    A tied model's output layer is its embedding. Drawn at std 0.25 (as the tiny Gemma's) in 64
    dimensions, its logits reach about 15 and rounding it to 8 bits moved scores by 0.019 (kept at
    F16: 0.0005), over Q8_0's 0.01 bound; a real tied model's does not (Gemma 3 270M: 0.004). So
    the tied tiny model draws its embedding at std 0.1, a head of a real model's scale."""
    from edge_annotator.export.hf_to_gguf import export
    from edge_annotator.train.config import parse_config
    from edge_annotator.train.job import train_and_merge
    from edge_annotator.train.tiny import tiny_base

    name = request.param
    kind, tied = CASES[name]
    tmp = tmp_path_factory.mktemp(name)
    base = tiny_base(kind, tmp / "base", tied=tied)
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(base), spec=str(TASKS / "emobank.yaml"), train_data=str(DATA / "emobank-train-64.jsonl"),
               output=str(tmp / "run"), max_steps=6, eval_every=3, val_max_items=8, max_length=1024,
               tiny={"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16,
                     "embed_std": 0.1 if tied else 0.25})
    done = train_and_merge(parse_config(raw, name))
    assert done.merged is not None
    out = {"name": name, "base": base, "merged": done.merged}
    for q in ("F16", "Q8_0", "Q4_K_M"):
        out[q] = export(done.merged, tmp / f"{name}-{q}.gguf", q).output
    return out


def test_the_tiny_bases_are_the_architectures_they_claim(arch: dict[str, Path]) -> None:
    conf = json.loads((arch["merged"] / "config.json").read_text())
    kind, tied = CASES[arch["name"]]
    assert conf["model_type"] == {"qwen3": "qwen3", "llama3": "llama"}[kind]
    assert conf["num_key_value_heads"] == 2 and conf["num_attention_heads"] == 4  # GQA
    assert bool(conf.get("tie_word_embeddings")) is tied
    if kind == "llama3":
        rope = conf.get("rope_scaling") or conf.get("rope_parameters") or {}
        assert rope.get("rope_type") == "llama3"
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(arch["Q8_0"]), "--json", "--no-hash"]).stdout)
    assert info["architecture"] == {"qwen3": "qwen3", "llama3": "llama"}[kind]


def test_token_tree_gradients_equal_one_sequence_per_prompt(arch: dict[str, Path]) -> None:
    from test_tree import _compare, _lora, _units
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_annotator.runtime.prompt import RenderOptions
    from edge_annotator.runtime.spec import load_spec
    from edge_annotator.train.examples import load_items

    model = _lora(AutoModelForCausalLM.from_pretrained(arch["base"], dtype=torch.float32, use_safetensors=True))
    tok = AutoTokenizer.from_pretrained(arch["base"])
    for task, data, permute in (("emobank", "emobank-train-64.jsonl", False), ("convabuse", "convabuse-train-300.jsonl",
                                                                              True)):
        spec = load_spec(TASKS / f"{task}.yaml")
        rng = np.random.default_rng(0)
        fields = [it.fields for it in load_items(DATA / data, spec)[:4]]
        _compare(model, tok, spec, _units(spec, fields, rng, permute), RenderOptions(1))


def test_export_keeps_the_adapted_tensors_and_parity_passes(arch: dict[str, Path]) -> None:
    """Parity passes at F16, Q8_0 and Q4_K_M, with the adapted tensors kept at Q8_0, found by name;
    the same prompt tokens and no decisive label flip."""
    from edge_annotator.export.parity import parity

    for q in ("F16", "Q8_0", "Q4_K_M"):
        man = json.loads(arch[q].with_name(arch[q].name + ".manifest.json").read_text())
        if q == "Q4_K_M":  # every projection of both layers, found by name, kept at Q8_0
            assert man["adapted_kept"]["count"] == 2 * 7 and man["adapted_kept"]["type"] == "Q8_0"
        rep = parity(arch["merged"], arch[q], DATA / "emobank-test-50.jsonl", max_items=20, threads=2)
        deltas = [(round(c["score_delta_mean"], 4), round(c["score_delta_max"], 4)) for c in rep["criteria"]]
        assert rep["pass"], (q, rep["checks"], rep["humans"], deltas)
        assert rep["tokens"]["identical"] == rep["tokens"]["total"]
        assert all(c["label_flips_decisive"] == 0 for c in rep["criteria"]), rep["criteria"]


def test_annotate_is_byte_identical_across_threads_and_resume(arch: dict[str, Path], tmp_path: Path) -> None:
    items = DATA / "emobank-test-50.jsonl"
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.jsonl"
        r = CliRunner().invoke(cli, ["annotate", str(arch["Q4_K_M"]), str(items), "--threads", threads, "-o", str(out)])
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(outs[0].splitlines(keepends=True)[:17]))
    r = CliRunner().invoke(cli, ["annotate", str(arch["Q4_K_M"]), str(items), "--threads", "2", "-o", str(part),
                                 "--resume"])
    assert r.exit_code == 0 and part.read_bytes() == outs[0]


def test_the_shipped_configs_load_with_a_base_of_their_architecture(tmp_path: Path) -> None:
    """Every config in configs/ loads and checks against a base folder of the right architecture,
    the published Qwen3 recipe among them (its paths pointed at shipped files)."""
    from edge_annotator.train.config import parse_config
    from edge_annotator.train.tiny import tiny_base

    qwen = tiny_base("qwen3", tmp_path / "qwen3", tied=True)
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        raw.update(train_data=str(DATA / "emobank-train-64.jsonl"), val_data=None, output=str(tmp_path / path.stem))
        if "qwen3" in path.name:
            raw.update(base_model=str(qwen), spec=str(TASKS / "qa-rubric.yaml"))
        cfg = parse_config(raw, str(path))
        assert cfg.spec and cfg.base_model


def test_from_gguf_converts_a_qwen3_and_a_llama_gguf(arch: dict[str, Path], tmp_path: Path) -> None:
    """A GGUF of either architecture back to an HF folder (transformers' GGUF loader), its tokenizer
    checked against the GGUF's own vocabulary, as from-gguf does for Gemma."""
    r = CliRunner().invoke(cli, ["from-gguf", str(arch["F16"]), str(tmp_path / "hf"), "--tokenizer",
                                 str(arch["base"])])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_from_gguf_without_llama_cpp_checks_against_a_converted_folder_s_fingerprint(
        arch: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where llama-cpp-python is not installed (a GPU machine), the tokenizer of a base folder converted
    with it is checked against the ids recorded there; a folder without them is refused."""
    import sys

    from edge_annotator.hf.tokcheck import FINGERPRINT

    r = CliRunner().invoke(cli, ["from-gguf", str(arch["F16"]), str(tmp_path / "hf"), "--tokenizer", str(arch["base"])])
    assert r.exit_code == 0, r.output
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not importable: as where it is not installed
    gguf = str(arch["F16"])
    r = CliRunner().invoke(cli, ["from-gguf", gguf, str(tmp_path / "hf2"), "--tokenizer", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf2" / FINGERPRINT).read_text() == (tmp_path / "hf" / FINGERPRINT).read_text()
    r = CliRunner().invoke(cli, ["from-gguf", gguf, str(tmp_path / "hf3"), "--tokenizer", str(arch["base"])])
    assert r.exit_code == 1 and "llama-cpp-python is not installed" in r.output, r.output
    assert not (tmp_path / "hf3").exists()
