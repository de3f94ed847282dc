"""The runtime is torch-free, installs under the project's own name, and its CLI documents itself."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.cli import cli

# Runs in a fresh interpreter where importing torch, transformers, Ray, pyarrow or matplotlib raises, as on a
# runtime-only install (jinja2 is not blocked: llama-cpp-python itself imports it).
BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'bitsandbytes', 'ray', 'pyarrow', 'matplotlib'):
            raise ImportError(f'{name} is blocked in this test')
        return None
sys.meta_path.insert(0, _Block())
"""


def _run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_runtime_imports_without_torch(tmp_path: Path) -> None:
    code = """
import importlib, pkgutil
import edge_annotator.runtime as rt
for m in pkgutil.iter_modules(rt.__path__):
    importlib.import_module(f'edge_annotator.runtime.{m.name}')
from edge_annotator.runtime.cli import cli
try:
    cli(['--help'], standalone_mode=False)
except SystemExit:
    pass
assert 'torch' not in sys.modules, 'torch was imported'
assert 'ray' not in sys.modules, 'ray was imported'
print('TORCH-FREE')
"""
    r = _run_blocked(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "TORCH-FREE" in r.stdout


@pytest.mark.slow
def test_annotate_runs_without_torch(tmp_path: Path, gemma_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join((DATA / "emobank-test-50.jsonl").read_text().splitlines(keepends=True)[:2]))
    code = f"""
from edge_annotator.runtime.cli import cli
try:
    cli(['annotate', {str(gemma_path)!r}, {str(inp)!r}, '--spec', {str(TASKS / 'emobank.yaml')!r},
         '-o', {str(tmp_path / 'out.jsonl')!r}], standalone_mode=False)
except SystemExit as e:
    assert not e.code, e.code
assert 'torch' not in sys.modules
print('OK')
"""
    r = _run_blocked(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_agree_report_without_its_extra_names_the_extra(tmp_path: Path) -> None:
    """matplotlib is the `report` extra's: without it --report says so, and nothing else fails."""
    pred = ROOT / "tests" / "golden" / "annotate-emobank-test-50.jsonl"
    code = f"""
import click
from edge_annotator.runtime.cli import cli
try:
    cli(['agree', {str(pred)!r}, {str(DATA / 'emobank-test-50.jsonl')!r}, '--spec', {str(TASKS / 'emobank.yaml')!r},
         '--report', {str(tmp_path / 'rep')!r}], standalone_mode=False)
except click.ClickException as e:
    print('MESSAGE', e.message)
"""
    r = _run_blocked(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "MESSAGE --report needs matplotlib and jinja2: pip install 'edge-annotator[report]'" in r.stdout
    assert not (tmp_path / "rep").exists()


def test_runtime_source_never_imports_torch_or_later_stages() -> None:
    banned = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
    for path in (ROOT / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.level == 0 else []
                if node.level and node.module.split(".")[0] in ("train", "export"):
                    names = [node.module]
            for n in names:
                top = n.split(".")[0]
                assert top not in banned, f"{path.name} imports {n}"
                assert not n.startswith(("edge_annotator.train", "edge_annotator.export")), f"{path.name} imports {n}"


BLOCK_TRAIN = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'edge_annotator.train' or name.startswith('edge_annotator.train.'):
            raise ImportError(f'{name} is blocked in this test')
        return None
sys.meta_path.insert(0, _Block())
"""


def test_export_and_hf_never_import_train(tmp_path: Path) -> None:
    """export/ depends on hf/ and the runtime, never on train/: in the source, and when every export
    and hf module is imported and the export commands run (parity's real call: test_export.py)."""
    for folder in ("export", "hf"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for m in mods:
                    assert not m.startswith("edge_annotator.train"), f"{folder}/{path.name} imports {m}"
    code = """
import importlib, pkgutil
for pkg in ('edge_annotator.export', 'edge_annotator.hf'):
    mod = importlib.import_module(pkg)
    for m in pkgutil.iter_modules(mod.__path__):
        importlib.import_module(f'{pkg}.{m.name}')
from edge_annotator.runtime.cli import cli
for cmd in ('export', 'parity'):
    try:
        cli([cmd, '--help'], standalone_mode=False)
    except SystemExit as e:
        assert not e.code, e.code
assert not [m for m in sys.modules if m.startswith('edge_annotator.train')]
print('NO-TRAIN')
"""
    r = subprocess.run([sys.executable, "-c", BLOCK_TRAIN + code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NO-TRAIN" in r.stdout


def test_only_namespaced_packages_are_installed(tmp_path: Path) -> None:
    code = """
import importlib
for bare in ('runtime', 'train', 'export'):
    try:
        importlib.import_module(bare)
    except ImportError:
        continue
    raise SystemExit(f'bare package {bare!r} is importable')
import edge_annotator.runtime, edge_annotator.train, edge_annotator.export
print('OK')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_help_lists_commands_with_examples() -> None:
    exe = Path(sys.executable).with_name("annotate-cli")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("annotate", "agree", "inspect", "data"):
        assert f"  {cmd} " in out
    assert "Examples:" in out
    runner = CliRunner()
    for cmd in ("annotate", "agree", "inspect", "data"):
        r = runner.invoke(cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output, cmd


def copy_tree(dst: Path) -> Path:
    """The checkout without its virtualenvs, models and caches: what a user's clone holds (setuptools
    leaves a build/ folder in the tree it builds, so builds run on a copy)."""
    import shutil

    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv*", "models", "build", ".git", "*.egg-info",
                                                              "__pycache__", ".*_cache", ".gpu"))
    return dst


@pytest.mark.slow
def test_gpu_check_runs_from_an_installed_wheel(tmp_path: Path, gemma_hf: Path) -> None:
    """Built as a wheel and installed apart from the checkout, train.gpu_check finds its config,
    spec and data in the package and runs its QLoRA check as far as this machine allows: on the CPU
    (NF4 with fp32 compute) to the end; the CUDA run needs a GPU."""
    wheels, site, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    copy_tree(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("edge_annotator-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert (site / "edge_annotator" / "tasks" / "emobank.yaml").is_file()
    assert (site / "edge_annotator" / "data" / "emobank-train-64.jsonl").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import edge_annotator.train.gpu_check as g, sys; assert g.__file__.startswith(sys.argv[1]), g.__file__; "
            "sys.exit(g.main(sys.argv[2:]))")
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(site), str(gemma_hf), "--steps", "2", "--device", "cpu"],
                       cwd=run, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["device"] == "cpu" and rep["steps"] == 2 and rep["merge_ok"]
    import torch

    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-c", code, str(site), str(gemma_hf)], cwd=run, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "no CUDA device" in r.stderr


def test_gpu_train_check_script_parses_and_stops_clearly_without_cuda(tmp_path: Path) -> None:
    """The GPU script's prelude runs anywhere: on a machine without CUDA it stops with one clear line."""
    script = ROOT / "scripts" / "gpu_train_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the script itself")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SITE": str(tmp_path / "s")}
    r = subprocess.run(["bash", str(script), str(tmp_path), str(tmp_path / "back")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 1 and "gpu_train_check: needs CUDA" in r.stderr, r.stdout + r.stderr
