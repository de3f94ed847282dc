"""The adapter route: an annotator as a LoRA adapter GGUF applied by llama.cpp to an untouched base
GGUF (export/lora_gguf.py, runtime/adapter_file.py), on the tiny recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def route(tmp_path_factory: pytest.TempPathFactory, gemma_hf: Path) -> dict[str, Path]:
    """The tiny recipe trained and merged; its base (built from scratch) as an F16 GGUF; the adapter."""
    from edge_annotator.export.hf_to_gguf import run_converter
    from edge_annotator.export.lora_gguf import export_adapter
    from edge_annotator.train.config import parse_config
    from edge_annotator.train.merge import merge
    from edge_annotator.train.trainer import train

    tmp = tmp_path_factory.mktemp("adapter")
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=str(TASKS / "emobank.yaml"),
               train_data=str(DATA / "emobank-train-64.jsonl"),
               output=str(tmp / "run"), max_steps=6, eval_every=3, val_max_items=8)
    cfg = parse_config(raw)
    res = train(cfg)
    merged = merge(cfg, res.output)
    base = tmp / "models" / "tiny-base-f16.gguf"
    base.parent.mkdir()
    run_converter(tmp / "run" / "base", base, "f16")
    adapter = export_adapter(merged, tmp / "models" / "tiny-lora.gguf", base).output
    return {"merged": merged, "base": base, "adapter": adapter, "tmp": tmp}


def test_the_adapter_file_carries_the_spec_and_names_its_base(route: dict[str, Path]) -> None:
    import gguf

    from edge_annotator.runtime.adapter_file import BASE_FILE, BASE_SHA256
    from edge_annotator.runtime.gguf_file import sha256_file

    r = gguf.GGUFReader(route["adapter"])
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields[BASE_FILE].contents() == route["base"].name
    assert r.fields[BASE_SHA256].contents() == sha256_file(route["base"])
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(route["adapter"]), "--json", "--no-hash"]).stdout)
    assert info["spec"]["name"] == "emobank" and info["provenance"]["export"]["route"] == "adapter"
    assert info["adapter"]["base_file"] == route["base"].name and info["adapter"]["matrices"]["matrices"] == 2 * 2 * 7
    assert info["blocks"]["types"] == {"F16": 1.0}  # the base beside it: the tiny F16 model
    man = json.loads(route["adapter"].with_name(route["adapter"].name + ".manifest.json").read_text())
    assert man["adapter_matrices"] == 2 * 7 and man["block_bits_per_weight"] == 16.0


def test_base_plus_adapter_scores_as_the_merged_model(route: dict[str, Path]) -> None:
    """Parity between the merged HF model and base + adapter in llama.cpp: the base F16, the update
    unrounded, so the scores agree to the fifth decimal."""
    from edge_annotator.export.parity import parity

    rep = parity(route["merged"], route["adapter"], DATA / "emobank-test-50.jsonl", threads=2)
    assert rep["pass"], rep["checks"]
    assert max(c["score_delta_max"] for c in rep["criteria"]) < 1e-3


def test_annotate_finds_the_base_beside_the_adapter_and_is_deterministic(route: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    items = DATA / "emobank-test-50.jsonl"
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.jsonl"
        r = CliRunner().invoke(cli, ["annotate", str(route["adapter"]), str(items), "--threads", threads,
                                     "-o", str(out)])
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 50
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(outs[0].splitlines(keepends=True)[:20]))
    r = CliRunner().invoke(cli, ["annotate", str(route["adapter"]), str(items), "-o", str(part), "--resume"])
    assert r.exit_code == 0 and part.read_bytes() == outs[0]
    w = tmp_path / "w.jsonl"
    r = CliRunner().invoke(cli, ["annotate", str(route["adapter"]), str(items), "--workers", "2", "-o", str(w)])
    assert r.exit_code == 0 and w.read_bytes() == outs[0], r.output


def test_a_missing_or_different_base_is_refused_in_one_line(route: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    alone = tmp_path / "alone.gguf"
    shutil.copy(route["adapter"], alone)
    items = DATA / "emobank-test-50.jsonl"
    r = CliRunner().invoke(cli, ["annotate", str(alone), str(items)])
    assert r.exit_code == 1 and "is not at" in r.output and "--base-model PATH" in r.output, r.output
    # what reads only the spec needs no base: the adapter's metadata holds it
    pred = tmp_path / "pred.jsonl"
    pred.write_bytes(b"".join(CliRunner().invoke(cli, ["annotate", str(route["adapter"]), str(items)])
                              .stdout_bytes.splitlines(keepends=True)[:3]))
    r = CliRunner().invoke(cli, ["convert", str(pred), "--to", "csv", "--model", str(alone),
                                 "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 0 and len((tmp_path / "p.csv").read_text().splitlines()) == 4, r.output
    # --base-model names it, for every command that loads the model
    r = CliRunner().invoke(cli, ["annotate", str(alone), str(items), "--base-model", str(route["base"]),
                                 "-o", str(tmp_path / "by-option.jsonl")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["inspect", str(alone), "--no-hash", "--json", "--base-model", str(route["base"])])
    assert r.exit_code == 0 and json.loads(r.stdout)["spec"] is not None, r.output
    other = tmp_path / route["base"].name
    other.write_bytes(route["base"].read_bytes()[:-16] + b"\0" * 16)  # same name, other bytes
    r = CliRunner().invoke(cli, ["annotate", str(alone), str(items)])
    assert r.exit_code == 1 and "has sha256" in r.output and "the adapter was trained on" in r.output, r.output
    monkeypatch.setenv("ANNOTATE_BASE_MODEL", str(route["base"]))  # the option's variable
    r = CliRunner().invoke(cli, ["annotate", str(alone), str(items), "-o", str(tmp_path / "ok.jsonl")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ok.jsonl").read_bytes() == (tmp_path / "by-option.jsonl").read_bytes()


def test_export_takes_the_adapter_route_by_default_where_the_base_came_from_a_gguf(route: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    """`export` at its default Q4_K_M: with no GGUF known for the run's base (built from scratch) it
    makes one merged file; once the base folder names the GGUF it was made from (as `annotate-cli
    base` and `from-gguf` write it) and that file lies beside the folder, the annotator is the
    adapter with that base placed beside it, and it annotates. --route merged and other --quant
    types keep one file; --route adapter without a base GGUF is refused in one line."""
    from edge_annotator.export.route import base_gguf_of, choose

    # the tiny base is built in code (its provenance says so); a copy of the run names its base folder
    run = tmp_path / "run"
    shutil.copytree(route["merged"].parent, run, ignore=shutil.ignore_patterns("checkpoint*"))
    merged, base_folder = run / "merged", run / "base"
    prov = json.loads((merged / "provenance.json").read_text())
    (merged / "provenance.json").write_text(json.dumps({**prov, "base_model": str(base_folder)}))
    assert base_gguf_of(merged) is None and choose(merged, "Q4_K_M", "auto", None) == ("merged", None)
    r = CliRunner().invoke(cli, ["export", str(merged), "-o", str(tmp_path / "x.gguf"), "--route", "adapter"])
    assert r.exit_code == 1 and "--adapter-on" in r.output and "Traceback" not in r.output, r.output

    check = base_folder / "edge_annotator_tokenizer.json"
    beside = base_folder.parent / route["base"].name
    shutil.copyfile(route["base"], beside)
    check.write_text(json.dumps({"gguf": route["base"].name, "texts": [], "ids": []}))
    assert base_gguf_of(merged) == beside
    assert choose(merged, "Q8_0", "auto", None) == ("merged", None)
    assert choose(merged, "Q4_K_M", "merged", None) == ("merged", None)
    out = tmp_path / "pub" / "annotator.gguf"
    r = CliRunner().invoke(cli, ["export", str(merged), "-o", str(out)])
    assert r.exit_code == 0, r.output
    man = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert man["route"] == "adapter" and (out.parent / beside.name).is_file()
    assert man["block_types"] == {"F16": 1.0}  # the tiny base is F16
    pred = tmp_path / "pred.jsonl"
    r = CliRunner().invoke(cli, ["annotate", str(out), str(DATA / "emobank-test-50.jsonl"), "-o", str(pred),
                                 "--threads", "2"])
    assert r.exit_code == 0 and len(pred.read_text().splitlines()) == 50, r.output
