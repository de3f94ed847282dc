"""The llama.cpp build and the CPU: no AMX kernels in what make install builds, a probe that keeps an
AMX build from crashing a job, and outputs that hold across kernel sets (runtime/cpu.py)."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS
from golden import GOLDEN, close_records, kernel_set

from edge_annotator.runtime import cpu
from edge_annotator.runtime.cli import cli

SEGFAULT = json.dumps([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])


@pytest.mark.parametrize("line, feats, amx", [
    # llama.cpp's own line on an AMD EPYC build
    ("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | LLAMAFILE = 1 | REPACK = 1 |",
     {"SSE3": 1, "AVX2": 1, "AVX512": 1, "AVX512_VNNI": 1, "LLAMAFILE": 1, "REPACK": 1}, False),
    # a plain pip build on a Sapphire Rapids VM (the crashing one)
    ("CPU : AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | REPACK = 1", None, True),
    ("CPU : AVX2 = 1 | AMX_INT8 = 0", {"AVX2": 1, "AMX_INT8": 0}, False),  # listed but off
    ("", {}, False),
])
def test_features_parse_llama_cpp_s_line(line: str, feats: dict[str, int] | None, amx: bool) -> None:
    got = cpu.features(line)
    assert feats is None or got == feats
    assert cpu.uses_amx(got) is amx


def _makefile_cflags() -> str:
    m = re.search(r"^LLAMA_CFLAGS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile sets LLAMA_CFLAGS"
    return m.group(1).strip()


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("gcc"), reason="x86-64 and gcc only")
def test_the_build_flags_leave_amx_out_and_keep_avx512() -> None:
    """The flags make install builds llama.cpp with, on a Sapphire Rapids target (what -march=native
    gives there): the AMX macros ggml's AMX kernels are compiled under are gone, AVX-512, VNNI and BF16
    stay. The runtime's remedy line names the same flags."""
    flags = _makefile_cflags()
    assert flags == cpu.NO_AMX_FLAGS

    def macros(*extra: str) -> set[str]:
        r = subprocess.run(["gcc", "-march=sapphirerapids", *extra, "-dM", "-E", "-x", "c", "-"], input="",
                           capture_output=True, text=True, check=True)
        return {line.split()[1] for line in r.stdout.splitlines() if line.startswith("#define __")}

    plain, safe = macros(), macros(*flags.split())
    assert {"__AMX_TILE__", "__AMX_INT8__", "__AMX_BF16__"} <= plain
    assert not {m for m in safe if m.startswith("__AMX")}
    assert {"__AVX512F__", "__AVX512VNNI__", "__AVX512BF16__", "__AVX512BW__"} <= safe


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AMX is x86-64")
def test_the_installed_build_has_no_amx_kernels() -> None:
    """What make install built (and inspect shows): llama.cpp's feature line without AMX, with the
    repacked kernels; its CPU library holds no ldtilecfg (objdump, where installed)."""
    feats = cpu.features()
    assert not cpu.uses_amx(feats), cpu.system_info()
    assert feats.get("REPACK") == 1, cpu.system_info()
    lib = cpu._library()
    if lib is not None and shutil.which("objdump"):
        r = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True)
        assert "ldtilecfg" not in r.stdout and "tileloadd" not in r.stdout


def test_a_probe_child_that_dies_by_a_signal_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cpu.PROBE_ENV, SEGFAULT)
    got = cpu.probe(tmp_path / "any.gguf")
    assert not got.ok and got.signal_name == "SIGSEGV" and "died by SIGSEGV" in got.describe()


def test_an_amx_build_whose_probe_crashes_loads_without_extra_buffers_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gemma_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On a build with AMX: the probe's child dies -> extra buffer types off, one warning naming the
    flags to rebuild with; the outcome is kept, so the next process asks no child (here a child that
    would exit 3 instead)."""
    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(cpu.PROBE_ENV, SEGFAULT)
    monkeypatch.setattr(cpu, "_decided", {})
    with caplog.at_level("WARNING"):
        assert cpu.extra_buffers_safe(gemma_path, amx=True) is False
    assert "uses AMX kernels" in caplog.text and cpu.NO_AMX_FLAGS in caplog.text and "SIGSEGV" in caplog.text
    kept = json.loads((tmp_path / "cache" / "decode-probe.json").read_text())
    assert [v["safe"] for v in kept.values()] == [False]
    monkeypatch.setattr(cpu, "_decided", {})  # a new process
    monkeypatch.setenv(cpu.PROBE_ENV, json.dumps([sys.executable, "-c", "raise SystemExit(3)"]))
    assert cpu.extra_buffers_safe(gemma_path, amx=True) is False
    # a build without AMX is never probed
    assert cpu.extra_buffers_safe(gemma_path, amx=False) is True


@pytest.mark.slow
def test_the_real_probe_decodes_and_doctor_says_what_the_build_uses(gemma_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    got = cpu.probe(gemma_path)
    assert got.ok, got.describe()
    r = CliRunner().invoke(cli, ["doctor", str(gemma_path)])
    assert r.exit_code == 0 and "decode check passed" in r.output and "AMX" in r.output, r.output
    # the same check with a child that crashes: one line, the cause and the remedy, exit 1
    monkeypatch.setenv(cpu.PROBE_ENV, SEGFAULT)
    r = CliRunner().invoke(cli, ["doctor", str(gemma_path)])
    assert r.exit_code == 1 and "died by SIGSEGV" in r.output and "Rebuild:" in r.output
    assert r.output.strip().count("\n") == 0, r.output


@pytest.mark.slow
def test_inspect_shows_the_build_s_cpu_features(gemma_path: Path) -> None:
    r = CliRunner().invoke(cli, ["inspect", str(gemma_path), "--json", "--no-hash"])
    b = json.loads(r.output)["backend"]["cpu"]
    assert r.exit_code == 0 and b["features"] and b["amx"] is cpu.uses_amx() and "cpu_advertises_amx" in b
    r = CliRunner().invoke(cli, ["inspect", str(gemma_path), "--no-hash"])
    assert "cpu kernels" in r.output and "AMX" in r.output


@pytest.mark.slow
def test_another_kernel_set_keeps_labels_and_probabilities_within_tolerance(
        gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp without its extra buffer types (no repacked Q4_K kernels: the workaround for an AMX
    build, and what another CPU might run) on the golden file's 50 sentences: every id, label and key
    as recorded, every probability and score within the golden tolerance."""
    import io

    from edge_annotator.runtime.jobs import JobOptions, annotate_file

    monkeypatch.setenv(cpu.BUFFERS_ENV, "0")
    monkeypatch.setattr(cpu, "_decided", {})
    assert kernel_set() != json.loads((GOLDEN / "KERNELS.json").read_text())
    buf = io.StringIO()
    annotate_file(gemma_path, DATA / "emobank-test-50.jsonl", buf, JobOptions(spec=TASKS / "emobank.yaml", threads=2))
    want = (GOLDEN / "annotate-emobank-test-50.jsonl").read_text()
    assert close_records(want, buf.getvalue()) == []
    got = [json.loads(line) for line in buf.getvalue().splitlines()]
    diff = max(abs(g["probs"][c][k] - w["probs"][c][k]) for g, w in zip(got, map(json.loads, want.splitlines()))
               for c in g["probs"] for k in g["probs"][c])
    print(f"max |dp| without extra buffers: {diff:.6f}")


def test_the_cross_kernel_comparison_still_catches_what_must_hold() -> None:
    want = (GOLDEN / "annotate-emobank-test-50.jsonl").read_text()
    rows = [json.loads(line) for line in want.splitlines()]
    assert close_records(want, want) == []

    def text(rs: list[dict]) -> str:
        return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rs)

    for change, needle in [
        (lambda r: r[3]["labels"].update(Valence=2), "line 4.labels.Valence: 2, recorded 1"),  # a label
        (lambda r: r[0]["probs"]["Arousal"].update({"1": r[0]["probs"]["Arousal"]["1"] + 0.2}), "line 1.probs"),
        (lambda r: r[9].update(id="other"), "line 10.id"),
        (lambda r: r.pop(), "49 lines, recorded 50"),
        (lambda r: r[2].pop("scores"), "line 3: keys"),
    ]:
        rs = json.loads(json.dumps(rows))
        change(rs)
        problems = close_records(want, text(rs))
        assert problems and needle in problems[0], (needle, problems[:3])


@pytest.mark.slow
def test_the_bench_s_llama_cpp_python_arms_get_the_same_guard(gemma_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """bench's naive loop and pp512 load through llama-cpp-python's Llama, which has no argument for
    the extra buffer types: where the guard turns them off (here forced by the environment), its model
    loads without them too, and the defaults are put back after."""
    from llama_cpp import Llama

    from edge_annotator.bench.arms import _safe_buffers

    monkeypatch.setenv(cpu.BUFFERS_ENV, "0")
    with _safe_buffers(str(gemma_path)):
        llm = Llama(str(gemma_path), n_ctx=256, verbose=False)
    assert llm.model_params.use_extra_bufts is False
    llm.close()
    monkeypatch.delenv(cpu.BUFFERS_ENV)
    with _safe_buffers(str(gemma_path)):
        llm = Llama(str(gemma_path), n_ctx=256, verbose=False)
    assert llm.model_params.use_extra_bufts is True
    llm.close()
