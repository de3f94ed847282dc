"""The runtime is torch-free, installs under the project's own name, and its CLI documents itself."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
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
for cmd in ('export', 'parity', 'embed-spec'):
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


# what runs as `python -m MODULE` or `python scripts/X.py`: each a click command with --help
MODULES = ("edge_annotator.runtime.cli", "edge_annotator.train.from_gguf", "edge_annotator.export.metadata",
           "edge_annotator.bench.train", "edge_annotator.bench.determinism", "edge_annotator.bench.arms",
           "edge_annotator.runtime.probe")
SCRIPTS = ("demo.py", "eval.py", "prepare_data.py", "gpu_check.py", "label_studio_check.py", "trust_table.py",
           "head_candidates.py", "seed_spread.py")


def test_cli_help_lists_commands_with_examples() -> None:
    from edge_annotator.runtime.commands import COMMANDS

    exe = Path(sys.executable).with_name("annotate-cli")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for entry in COMMANDS:
        assert f"  {entry.name} " in out, entry
    assert "Examples:" in out
    runner = CliRunner()
    for entry in COMMANDS:
        r = runner.invoke(cli, [entry.name, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output, entry


def test_one_table_lists_every_command_and_its_extra() -> None:
    """runtime/commands.py is the one list: annotate-cli holds exactly its commands, each the click
    command its row names; each extra named is one of pyproject's; pyproject lists no commands of its
    own (one console script, annotate-cli); and a requirement's extra is read from its marker."""
    import tomllib

    from edge_annotator.runtime.commands import COMMANDS, missing

    assert sorted(cli.commands) == sorted(e.name for e in COMMANDS)
    assert len({e.name for e in COMMANDS}) == len(COMMANDS)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for entry in COMMANDS:
        assert entry.extra is None or entry.extra in extras, entry
        module, _, attribute = entry.target.partition(":")
        assert cli.commands[entry.name] is getattr(importlib.import_module(module), attribute), entry
    assert project["scripts"] == {"annotate-cli": "edge_annotator.runtime.cli:main"}
    assert "entry-points" not in project
    # this environment has every extra: nothing is missing, and a name that is no extra requires nothing
    assert [missing(x) for x in ("train", "export", "serve", "no-such-extra")] == [[], [], [], []]


def test_every_entry_point_is_a_click_command() -> None:
    """One style of entry point: no argparse and no hand-read sys.argv in the package or scripts/;
    every module and script that runs as a program answers --help (click's) and exits 0."""
    files = [p for d in ("runtime", "train", "export", "hf", "bench", "scripts") for p in (ROOT / d).glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert "argparse" not in [a.name for a in node.names], f"{path} imports argparse"
            if isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", "") == "sys":
                raise AssertionError(f"{path}:{node.lineno} reads sys.argv")
    runs = [[sys.executable, "-m", m] for m in MODULES] + [[sys.executable, str(ROOT / "scripts" / s)] for s in SCRIPTS]
    for argv in runs:
        r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0 and "Usage:" in r.stdout and "Options:" in r.stdout, (argv, r.stderr[-2000:])


def copy_tree(dst: Path) -> Path:
    """The checkout without its virtualenvs, models and caches: what a user's clone holds (setuptools
    leaves a build/ folder in the tree it builds, so builds run on a copy)."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv*", "models", "build", ".git", "*.egg-info",
                                                              "__pycache__", ".*_cache", ".gpu"))
    return dst


def wheel_links() -> list[str]:
    """pip arguments that take llama-cpp-python from the wheel make install built (without AMX: README,
    Install), so a fresh virtualenv neither rebuilds it (10 minutes) nor gets a build with AMX."""
    links = os.environ.get("EDGE_ANNOTATOR_WHEELS")
    return ["--find-links", links] if links and Path(links).is_dir() else []


def install_alone(tmp_path: Path, extras: str = "") -> Path:
    """A fresh virtualenv holding this project (a copy of the checkout) with EXTRAS and nothing else
    of ours; its bin/ folder. Packages come from this machine's wheels, pinned by constraints.txt."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    src = copy_tree(tmp_path / "src")
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), *wheel_links(),
                        f"{src}[{extras}]" if extras else str(src)], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv / "bin"


@pytest.mark.slow
def test_gpu_check_runs_from_an_installed_wheel(tmp_path: Path, gemma_hf: Path) -> None:
    """With the package built as a wheel and installed apart from the checkout, scripts/gpu_check.py
    (copied elsewhere too) finds its config, spec and data in the package and runs its QLoRA check as
    far as this machine allows: on the CPU (NF4 with fp32 compute) to the end; the CUDA run needs a GPU."""
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
    run = tmp_path / "elsewhere"
    run.mkdir()
    script = shutil.copy(ROOT / "scripts" / "gpu_check.py", run / "gpu_check.py")
    where = subprocess.run([sys.executable, "-c", "import edge_annotator.train as t; print(t.__file__)"], cwd=run,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    r = subprocess.run([sys.executable, script, str(gemma_hf), "--steps", "2", "--device", "cpu"],
                       cwd=run, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["device"] == "cpu" and rep["steps"] == 2 and rep["merge_ok"]
    import torch

    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, script, str(gemma_hf)], cwd=run, env=env,
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


# -- weights: safetensors and GGUF only ----------------------------------------------------------
def test_model_weights_are_never_unpickled() -> None:
    for stage in ("runtime", "hf", "train", "export", "bench", "scripts"):
        for path in (ROOT / stage).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    assert not any(n.split(".")[0] in ("pickle", "dill", "joblib") for n in names), path
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                kw = {k.arg for k in node.keywords}
                if node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                    assert "weights_only" in kw, f"{path}:{node.lineno}: torch.load without weights_only"
                if (node.func.attr == "from_pretrained" and getattr(node.func.value, "id", "") ==
                        "AutoModelForCausalLM"):
                    ok = kw & {"use_safetensors", "gguf_file"} or any(k.arg is None for k in node.keywords)
                    assert ok, f"{path}:{node.lineno}: from_pretrained may read a pickled checkpoint"


def test_scripts_and_docs_name_only_commands_and_modules_that_exist() -> None:
    """Every `annotate-cli CMD` and `python -m MODULE` in the shell scripts, the Makefile and the code
    blocks of README and docs/ names a command annotate-cli has and a module that imports (a renamed or moved
    entry point breaks no script silently)."""
    import importlib.util
    import re

    texts = {p: p.read_text() for p in [*(ROOT / "scripts").glob("*.sh"), ROOT / "Makefile"]}
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        texts[doc] = "\n".join(doc.read_text().split("```")[1::2])  # inside code blocks only
    seen = 0
    for path, text in texts.items():
        text = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))  # commands, not prose
        for cmd in re.findall(r"(?:annotate-cli|\$\(CLI\)|edge_annotator\.runtime\.cli)\s+([a-z][\w-]*)", text):
            assert cmd in cli.commands, f"{path.name}: annotate-cli {cmd} is not a command"
            seen += 1
        for mod in re.findall(r"-m\s+(edge_annotator(?:\.\w+)+)", text):
            assert importlib.util.find_spec(mod) is not None, f"{path.name}: python -m {mod} does not exist"
            seen += 1
    assert seen > 15, seen  # the patterns still match what the files say


def test_readme_is_a_user_guide_and_its_measurements_live_in_docs() -> None:
    """README.md: at most 200 lines, and no measurement table but the headline one (spliced by
    `make eval`); the CLI table is the one other table. Every page it links to exists."""
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200, len(text.splitlines())
    headline = text.split("<!-- begin headline -->", 1)[1].split("<!-- end headline -->", 1)[0]
    rest = text.replace(headline, "")
    headers = [ln for ln in rest.splitlines() if re.match(r"\|.*\|$", ln) and not ln.startswith("|---")]
    tables = [h for h, nxt in zip(rest.splitlines(), rest.splitlines()[1:]) if h in headers and nxt.startswith("|---")]
    assert tables == ["| command | what it does |"], tables
    for link in re.findall(r"\]\(((?:docs|data)/[^)#]+)\)", text):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_no_stage_writes_the_process_environment() -> None:
    """The base model of an adapter file is a parameter (LlamaModel(path, base=...)), never handed
    over through os.environ: no module of runtime/, export/, train/, hf/ or bench/ assigns, pops,
    updates or sets a variable of the environment (the CLI only reads ANNOTATE_BASE_MODEL)."""
    writes = {"pop", "update", "setdefault", "clear", "__setitem__", "__delitem__"}
    for part in ("runtime", "export", "train", "hf", "bench"):
        for path in (ROOT / part).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                    targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                    for t in targets:
                        if isinstance(t, ast.Subscript) and getattr(t.value, "attr", "") == "environ":
                            raise AssertionError(f"{path}:{node.lineno}: writes os.environ")
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = node.func.value
                    if node.func.attr in writes and getattr(owner, "attr", "") == "environ":
                        raise AssertionError(f"{path}:{node.lineno}: os.environ.{node.func.attr}")
                    if node.func.attr in ("putenv", "unsetenv") and getattr(owner, "id", "") == "os":
                        raise AssertionError(f"{path}:{node.lineno}: os.{node.func.attr}")


def test_runtime_has_no_import_circle() -> None:
    """runtime/'s modules import one another in one direction: every `from .x import` and `from
    edge_annotator.runtime.x import`, at the top or inside a function, is an edge, and the graph
    has no cycle (the leaves: errors, untrusted, gguf_file, llama_lib; engine builds on them)."""
    mods = {p.stem: p for p in (ROOT / "runtime").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edge_annotator.runtime."):
                deps.add((node.module or "").split(".")[2])
        graph[name] = deps & set(mods) - {name}
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            raise AssertionError("runtime/ import circle: " + " -> ".join(path[path.index(mod):] + [mod]))
        if mod not in done:
            for dep in sorted(graph[mod]):
                visit(dep, [*path, mod])
            done.add(mod)

    for mod in sorted(graph):
        visit(mod, [])
    assert {"errors", "untrusted", "gguf_file", "llama_lib"} <= {m for m, d in graph.items() if d <= {"errors"}}


def test_design_layout_names_every_module() -> None:
    """docs/design.md's layout names every module of the package (a module added without a place in
    the map fails here)."""
    text = (ROOT / "docs" / "design.md").read_text()
    layout = text.split("## Layout", 1)[1].split("```", 2)[1]
    for part in ("runtime", "hf", "train", "export", "bench"):
        block = layout.split(f"\n{part}/", 1)[1]
        block = block[: min((block.find(f"\n{o}/") for o in ("runtime", "hf", "train", "export", "bench", "configs")
                             if block.find(f"\n{o}/") > 0), default=len(block))]
        for path in sorted((ROOT / part).glob("*.py")):
            if path.name != "__init__.py":
                assert path.name in block.split(), f"docs/design.md's layout does not name {part}/{path.name}"


def test_no_two_modules_share_a_file_name() -> None:
    """One name, one meaning: no module file name repeats across the package's parts (each part's
    __init__.py and cli.py aside)."""
    from collections import Counter

    names = Counter(p.name for part in ("runtime", "hf", "train", "export", "bench") for p in (ROOT / part).glob("*.py")
                    if p.name not in ("__init__.py", "cli.py"))
    assert not [n for n, k in names.items() if k > 1], [n for n, k in names.items() if k > 1]
