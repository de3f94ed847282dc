"""annotate-cli on GPUs: --gpu-layers everywhere, a build without a GPU backend refuses it, and the
determinism contract's measurement (bench/determinism.py) compares what it should.

On this CPU-only build the contract's GPU rows cannot run: test_gpu_offload_keeps_labels is marked
`gpu` and skipped unless llama-cpp-python has a GPU backend (make install-cuda). The rest runs here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, TASKS

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.engine import GPU_ALL
from edge_annotator.runtime.llama_lib import gpu_offload_supported

SPEC = TASKS / "emobank.yaml"


def _sample(tmp_path: Path, n: int) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("".join((DATA / "emobank-test-50.jsonl").read_text().splitlines(keepends=True)[:n]))
    return p


def test_gpu_layers_takes_a_count_or_all_and_nothing_else(tmp_path: Path) -> None:
    from edge_annotator.runtime.options import GpuLayers

    t = GpuLayers()
    assert (t.convert("0", None, None), t.convert("12", None, None), t.convert("ALL", None, None)) == (0, 12, GPU_ALL)
    inp = _sample(tmp_path, 1)
    for bad in ("-3", "half", "1.5"):
        r = CliRunner().invoke(cli, ["annotate", "x.gguf", str(inp), "--gpu-layers", bad])
        assert r.exit_code == 2 and "neither a count of layers" in r.output, r.output


@pytest.mark.slow
@pytest.mark.skipif(gpu_offload_supported(), reason="this llama-cpp-python build has a GPU backend")
@pytest.mark.parametrize("command", ["annotate", "bench", "parity"])
def test_a_cpu_only_build_refuses_gpu_layers_in_one_line(tmp_path: Path, gemma_path: Path, command: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU backend llama.cpp ignores n_gpu_layers: the run would silently be a CPU run."""
    inp = _sample(tmp_path, 2)
    args = {"annotate": ["annotate", str(gemma_path), str(inp), "--spec", str(SPEC), "--gpu-layers", "all"],
            "bench": ["bench", "--model", str(gemma_path), "--items", "2", "--batch", "1", "--gpu-layers", "4"],
            "parity": ["parity", str(tmp_path), str(gemma_path), str(inp), "--gpu-layers", "4"]}[command]
    if command == "parity":  # the flag from the environment, as a job script would set it
        args = args[:-2]
        monkeypatch.setenv("ANNOTATE_GPU_LAYERS", "all")
        from edge_annotator.runtime.spec import load_spec

        (tmp_path / "spec.json").write_text(load_spec(SPEC).to_json())  # read, then the model is refused
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    assert "runs on the CPU only" in r.output and "make install-cuda" in r.output
    if command != "bench":  # bench reports its failed arm's stderr tail
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.slow
def test_determinism_check_compares_runs_and_finds_a_change(tmp_path: Path, gemma_path: Path) -> None:
    """The contract's measurement on the CPU: two runs are byte-identical; a record changed by
    hand (one probability moved by 0.01, one label) is found and measured."""
    from edge_annotator.bench.determinism import compare, markdown, run

    inp = _sample(tmp_path, 6)
    res = run(gemma_path, inp, SPEC, [0], repeats=2, threads=2, naive=False)
    row = res["settings"][0]
    assert row["repeats_byte_identical"] and row["vs_reference"]["byte_identical"]
    assert row["vs_reference"]["labels_same"] == 1.0 and row["vs_reference"]["max_abs_dp"] == 0.0
    assert res["backend"]["gpu_offload"] == gpu_offload_supported()
    from edge_annotator.bench.determinism import annotate_lines

    lines, _ = annotate_lines(gemma_path, inp, SPEC, 0, 2)
    rec = json.loads(lines[3])
    level, p = next(iter(rec["probs"]["Valence"].items()))
    rec["probs"]["Valence"][level] = p + 0.01
    rec["labels"]["Arousal"] = "changed"
    rec["scores"]["Dominance"] += 0.25
    changed = lines[:3] + [json.dumps(rec)] + lines[4:]
    got = compare(lines, changed)
    assert not got["byte_identical"]
    assert got["labels_same"] == pytest.approx(17 / 18)
    assert got["max_abs_dp"] == pytest.approx(0.01) and got["max_abs_dscore"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="not the same job"):
        compare(lines, lines[:-1])
    assert "| 0 (CPU) |" in markdown(res, "test")


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_offload_supported(), reason="needs a GPU build of llama-cpp-python (make install-cuda)")
def test_gpu_offload_keeps_labels(tmp_path: Path, gemma_path: Path) -> None:
    """On a GPU: repeated runs write the same bytes, and full offload keeps >= 95% of the CPU's labels."""
    from edge_annotator.bench.determinism import run

    res = run(gemma_path, _sample(tmp_path, 20), SPEC, [0, GPU_ALL], repeats=2, threads=4, naive=False)
    cpu, gpu = res["settings"]
    assert cpu["repeats_byte_identical"] and gpu["repeats_byte_identical"]
    assert gpu["vs_reference"]["labels_same"] >= 0.95
