"""Export and parity on the tiny recipe, end to end on CPU: train, merge, export F16/Q8_0/Q4_0, parity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, gemma_hf: Path) -> Path:
    from edge_annotator.train.config import parse_config
    from edge_annotator.train.merge import merge
    from edge_annotator.train.trainer import train

    tmp = tmp_path_factory.mktemp("tiny")
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"), output=str(tmp / "run"),
               max_steps=6, eval_every=3, val_max_items=8)
    cfg = parse_config(raw)
    res = train(cfg)
    return merge(cfg, res.output, extra_provenance={"val_alpha": res.state.best_alpha})


@pytest.fixture(scope="module")
def exported(merged: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edge_annotator.export.hf_to_gguf import export

    out = tmp_path_factory.mktemp("gguf")
    return {q: export(merged, out / f"tiny-{q}.gguf", q).output for q in ("F16", "Q8_0", "Q4_0")}


def test_export_writes_a_self_describing_file_and_manifest(exported: dict[str, Path], merged: Path) -> None:
    import llama_cpp

    for quant, path in exported.items():
        man = json.loads(path.with_name(path.name + ".manifest.json").read_text())
        assert man["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert man["verify"]["add_bos"] is True and man["quant"] == quant
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporary leftovers"
        llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)  # plain llama-cpp-python loads it
        assert llm.n_vocab() == 262144
        del llm
        info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"]).stdout)
        assert info["spec"]["name"] == "emobank" and info["quantization"] == quant
        assert info["provenance"]["export"]["quant"] == quant and "data_sha256" in info["provenance"]
    sizes = {q: p.stat().st_size for q, p in exported.items()}
    # the tiny recipe adapts every projection, so its Q4_0 file keeps them all at Q8_0 (--adapted-type)
    assert sizes["Q4_0"] <= sizes["Q8_0"] < sizes["F16"]


def test_exported_annotator_runs_without_spec_flag(exported: dict[str, Path], tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join((DATA / "emobank-test-50.jsonl").read_text().splitlines(keepends=True)[:3]))
    r = CliRunner().invoke(cli, ["annotate", str(exported["Q8_0"]), str(inp)])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 3


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_0"])
def test_parity_layers(exported: dict[str, Path], merged: Path, quant: str) -> None:
    from edge_annotator.export.parity import parity

    rep = parity(merged, exported[quant], DATA / "emobank-test-50.jsonl", max_items=12)
    assert rep["tokens"]["share"] == 1.0
    for c in rep["criteria"]:
        # measured on the tiny model (12 items): mean KL < 0.0001 at every type (its linear layers
        # are all adapted, so they stay Q8_0 inside the Q4_0 file), mean |delta score| 0.0002 at
        # F16 and 0.003 at Q8_0; 0.01-0.06 while its layers ran on another RoPE base than llama.cpp's
        assert c["kl_mean"] < 0.002, c
        assert 0 <= c["score_delta_mean"] <= c["score_delta_max"]
    assert rep["checks"]["labels"] and rep["checks"]["scores"], rep["criteria"]
    assert rep["pass"], rep["checks"]


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_a_skewed_model_s_near_lossless_export_passes(exported: dict[str, Path], merged: Path, quant: str) -> None:
    """The tiny recipe learns the label prior: at least 95% of its labels are one level, where label
    alpha HF vs GGUF is ill-conditioned (one flip among 98 "3"s gives 0.85). The gate judges flips,
    score changes and KL instead, and a near-lossless file passes."""
    from edge_annotator.export.parity import parity

    rep = parity(merged, exported[quant], DATA / "emobank-test-50.jsonl")
    assert all(c["top_label_share_hf"] >= 0.95 for c in rep["criteria"]), [c["labels_hf"] for c in rep["criteria"]]
    assert rep["pass"], (rep["checks"], rep["criteria"])


def test_parity_exits_nonzero_when_a_threshold_fails(exported: dict[str, Path], merged: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_annotator.export import parity as parity_mod

    monkeypatch.setitem(parity_mod.THRESHOLDS, "human_alpha_drop", -1.0)  # no export can pass this
    r = CliRunner().invoke(cli, ["parity", str(merged), str(exported["F16"]), str(DATA / "emobank-test-50.jsonl"),
                                 "--max-items", "4"])
    assert r.exit_code == 1 and "FAIL: humans" in r.stdout


def test_export_refuses_a_folder_that_is_not_a_merged_annotator(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    r = CliRunner().invoke(cli, ["export", str(tmp_path), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and "missing" in r.stderr and "spec.json" in r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_a_failed_export_leaves_no_gguf(merged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_annotator.export import hf_to_gguf as convert

    monkeypatch.setenv("EDGE_ANNOTATOR_CONVERTER", str(tmp_path / "nowhere"))
    with pytest.raises(convert.ExportError, match="converter is not installed"):
        convert.export(merged, tmp_path / "out.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == [], "neither the output nor temporary files remain"


def test_parity_json_bytes_are_as_recorded(exported: dict[str, Path], merged: Path) -> None:
    """parity --json on the tiny model's Q8_0 export, as recorded before the redesign (issue 16),
    run in a process where importing edge_annotator.train fails (export depends on hf/, not train/);
    the two paths it names are reduced to file names."""
    import subprocess
    import sys

    from golden import check_golden
    from test_packaging import BLOCK_TRAIN

    code = BLOCK_TRAIN + f"""
from edge_annotator.runtime.cli import cli
cli(['parity', {str(merged)!r}, {str(exported["Q8_0"])!r}, {str(DATA / "emobank-test-50.jsonl")!r},
     '--threads', '2', '--json'])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1) and r.stdout.startswith("{"), r.stderr[-3000:]
    text = r.stdout.replace(str(merged), merged.name).replace(str(exported["Q8_0"]), exported["Q8_0"].name)
    check_golden("parity-tiny-Q8_0-emobank-test-50.json", text)


@pytest.mark.full  # a fresh virtualenv; make test checks the imports: test_export_and_hf_never_import_train
def test_the_export_extra_alone_runs_export_and_parity(merged: Path, tmp_path: Path) -> None:
    """pip install '.[export]' into a fresh virtualenv, nothing else of the project's: export makes a
    Q8_0 file of the tiny merged model and parity passes on it, both in that environment (the
    converter, which make install puts in its own folder, found through EDGE_ANNOTATOR_CONVERTER)."""
    import os
    import subprocess

    from test_packaging import install_alone

    from edge_annotator.export.hf_to_gguf import converter_dir

    bin_ = install_alone(tmp_path, "export")
    r = subprocess.run([str(bin_ / "python"), "-c", "import peft"], capture_output=True, text=True)
    assert r.returncode != 0, "the train extra's peft is in the export-only environment"
    env = {**os.environ, "EDGE_ANNOTATOR_CONVERTER": str(converter_dir())}
    for cmd in ("export", "parity", "embed-spec", "from-gguf"):
        r = subprocess.run([str(bin_ / "annotate-cli"), cmd, "--help"], capture_output=True, text=True, env=env)
        assert r.returncode == 0 and "Examples:" in r.stdout, (cmd, r.stderr[-2000:])
    cli = str(bin_ / "annotate-cli")
    out = tmp_path / "tiny-Q8_0.gguf"
    r = subprocess.run([cli, "export", str(merged), "-o", str(out), "--quant", "Q8_0"], env=env,
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0 and out.is_file(), r.stdout[-2000:] + r.stderr[-3000:]
    r = subprocess.run([cli, "parity", str(merged), str(out), str(DATA / "emobank-test-50.jsonl"), "--max-items", "10",
                        "--json"], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["pass"] and rep["items"] == 10 and rep["tokens"]["share"] == 1.0


def test_one_table_of_quantization_types_matches_llama_cpp() -> None:
    """export/quants.py names each type by gguf-py's enums; llama.cpp's own ABI agrees on every value
    export hands it (the quantizer's llama_ftype, a tensor override's ggml_type)."""
    import llama_cpp

    from edge_annotator.export.quants import ADAPTED_TYPES, FILE_TYPES, QUANTS

    for name in FILE_TYPES:
        assert int(QUANTS[name].file_type) == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}"), name
    for name in ADAPTED_TYPES:
        assert int(QUANTS[name].tensor_type) == getattr(llama_cpp, f"GGML_TYPE_{name}"), name


def _tensor_types(path: Path) -> dict[str, str]:
    from edge_annotator.runtime.gguf_file import read_tensor_infos

    return {t.name: t.qtype.name for t in read_tensor_infos(path).values()}


def test_adapted_tensors_keep_q8_0_inside_a_4bit_file(exported: dict[str, Path], merged: Path) -> None:
    from edge_annotator.export.mix import adapted_tensors, hf_weight_sizes

    kept = adapted_tensors(merged, hf_weight_sizes(merged))
    # the tiny recipe adapts every attention and MLP projection of its 2 layers
    assert len(kept) == 14 and "blk.0.attn_q.weight" in kept and "blk.1.ffn_down.weight" in kept
    path = exported["Q4_0"]
    man = json.loads(path.with_name(path.name + ".manifest.json").read_text())
    assert man["adapted_kept"]["type"] == "Q8_0" and man["adapted_kept"]["count"] == 14
    types = _tensor_types(path)
    assert {types[n] for n in kept} == {"Q8_0"}
    n_weights = sum(hf_weight_sizes(merged).values())
    assert man["bits_per_weight"] == round(8 * path.stat().st_size / n_weights, 3)


def test_imatrix_and_adapted_type_same(merged: Path, exported: dict[str, Path], tmp_path: Path) -> None:
    from edge_annotator.export.mix import adapted_tensors, compute_imatrix, hf_weight_sizes

    im = compute_imatrix(merged, DATA / "emobank-train-64.jsonl", max_items=4)
    # every linear layer in the blocks, by GGUF name
    assert set(im) == set(adapted_tensors(merged, hf_weight_sizes(merged)))
    assert all(v.ndim == 1 and (v >= 0).all() and v.mean() > 0 for v in im.values())
    out = tmp_path / "im.gguf"
    r = CliRunner().invoke(cli, ["export", str(merged), "-o", str(out), "--quant", "Q4_0", "--adapted-type", "same",
                                 "--imatrix", str(DATA / "emobank-train-64.jsonl"), "--imatrix-items", "4"])
    assert r.exit_code == 0, r.output
    man = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert man["adapted_kept"] is None and man["imatrix"]["tensors"] == 14
    types = _tensor_types(out)
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert out.stat().st_size < exported["Q4_0"].stat().st_size
    from edge_annotator.export.parity import parity

    assert parity(merged, out, DATA / "emobank-test-50.jsonl", max_items=8)["pass"]


def test_parity_gates_the_score_before_calibration() -> None:
    """A steep step of an isotonic calibration stretches a tiny change of the model's score; the
    gate reads the model's own score and reports the calibrated change beside it."""
    from dataclasses import replace

    from edge_annotator.export.parity import _criterion_row, thresholds_for
    from edge_annotator.runtime.annotator import criterion_score
    from edge_annotator.runtime.data import Item
    from edge_annotator.runtime.spec import load_spec

    c = load_spec(TASKS / "emobank.yaml").criteria[1]
    c = replace(c, calibration=((2.728, 1.8), (2.734, 2.53), (3.2, 3.87)))  # a slope of about 120, then 3
    items, hf, gguf = [], [], []
    for i, a in enumerate((0.3563, 0.30)):  # raw score 3.8 - 3a: 2.731 (on the steep step) and 2.9
        items.append(Item(id=str(i), fields={"text": "x"}, path="t.jsonl", line=i + 1))
        hf.append({c.name: criterion_score(c, [a, 0.1, 0.1, 0.7 - a, 0.1])})
        gguf.append({c.name: criterion_score(c, [a - 0.001, 0.1, 0.1, 0.7 - a + 0.001, 0.1])})
    row = _criterion_row(c, items, gguf, hf, thresholds_for("Q4_K_M"))
    assert row["score_delta_max"] == pytest.approx(0.003, abs=1e-4)
    assert row["calibrated_score_delta_max"] > 0.3 > thresholds_for("Q4_K_M")["score_delta_max"]
    assert row["scores_pass"]
