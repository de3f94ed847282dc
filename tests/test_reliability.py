"""Reliability, end to end: bad input, a job killed with -9, bad model files, no network, no
templates or paths taken from a model file, a pickled checkpoint, and memory that does not grow
with the input. (The parser's fuzzing is in test_data.py, the id table's in test_jobs.py, the
static scans in test_packaging.py.)

README.md's "Guarantees" section points at each of these tests.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.spec import load_spec

SPEC = str(TASKS / "emobank.yaml")
EMOBANK = DATA / "emobank-test-50.jsonl"
SPEC_OBJ = load_spec(TASKS / "emobank.yaml")
CLI = [sys.executable, "-m", "edge_annotator.runtime.cli"]


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _good(i: int) -> dict:
    return json.loads(EMOBANK.read_text().splitlines()[i])


# -- the bad-input corpus ------------------------------------------------------------------------
# (raw JSONL line, expected outcome): "ok" = annotated; "dup" = a repeated row of an item already
# annotated (no line of its own); otherwise a needle of the error record's message, and its field.
def _corpus() -> list[tuple[bytes, str, str | None]]:
    g = [_good(i) for i in range(6)]
    J = lambda d: json.dumps(d, ensure_ascii=False).encode()  # noqa: E731
    return [
        (J(g[0]), "ok", None),
        (b'{"id": "m1", "text": "unterminated', "malformed JSON", None),
        (b'["a", "list"]', "expected a JSON object", None),
        (b'{"id": "u1", "text": "caf\xe9 in latin-1"}', "not valid UTF-8", None),
        (J({"id": "nf", "sentence": "the wrong field"}), "missing (the spec 'emobank' needs text", "text"),
        (J({"text": "no id at all"}), "every record needs an 'id'", "id"),
        (J({**g[1], "source": "unknown fields are ignored", "extra": [1, 2]}), "ok", None),
        (J({"id": "e1", "text": ""}), "is empty", "text"),
        (J({"id": "w1", "text": " \t\n "}), "is empty", "text"),
        (J({"id": "big", "text": "word " * 200_000}), "text too long", "text"),       # 1 MB
        (J({"id": "c1", "text": "bell\x07 escape\x1b[31m tab\t and \x7f: control characters"}), "ok", None),
        (J({"id": "nul", "text": "a NUL \x00 inside"}), "NUL character", "text"),
        (J({"id": "obj", "text": {"nested": "object"}}), "must be text", "text"),
        (J(g[2]), "ok", None),
        (J(g[2]), "dup", None),                                                       # another rater's row
        (J({**g[2], "text": "same id, other text"}), "duplicate id", "id"),
        (J({**g[3], "labels": {"Valence": 9, "Nope": "x"}}), "ok", None),   # annotate does not read labels
        (J(g[4]), "ok", None),
    ]


def _corpus_file(tmp_path: Path) -> Path:
    inp = tmp_path / "corpus.jsonl"
    inp.write_bytes(b"\n".join(raw for raw, _, _ in _corpus()) + b"\n")
    return inp


@pytest.mark.slow
def test_bad_input_corpus_skip_gives_one_defined_outcome_per_record(tmp_path: Path, gemma_path: Path) -> None:
    corpus, inp = _corpus(), _corpus_file(tmp_path)
    out = tmp_path / "out.jsonl"
    r = _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "--on-error", "skip", "-o", str(out))
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    expected = [(line, want, fld) for line, (_, want, fld) in enumerate(corpus, 1) if want != "dup"]
    assert len(recs) == len(expected)
    for rec, (line, want, fld) in zip(recs, expected):
        if want == "ok":
            assert "labels" in rec and "error" not in rec, (line, rec)
        else:
            e = rec["error"]
            assert e["file"] == str(inp) and e["line"] == line and e["field"] == fld, (line, e)
            assert want in e["message"], (line, e)


@pytest.mark.slow
def test_bad_input_corpus_fail_stops_at_the_first_and_keeps_what_was_done(tmp_path: Path, gemma_path: Path) -> None:
    inp = _corpus_file(tmp_path)
    out = tmp_path / "out.jsonl"
    r = _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "-o", str(out))
    assert r.exit_code == 1 and f"{inp}:2:" in r.stderr and "malformed JSON" in r.stderr
    assert len(out.read_text().splitlines()) == 1  # the record before it, flushed


@pytest.mark.slow
def test_other_encodings_and_csv_with_embedded_newlines(tmp_path: Path, gemma_path: Path) -> None:
    # UTF-16 and Latin-1 files: every record is refused with its line, nothing is misread
    for enc in ("utf-16", "latin-1"):
        p = tmp_path / f"{enc}.jsonl"
        p.write_bytes('{"id": "x1", "text": "Ça va très bien"}\n{"id": "x2", "text": "naïve"}\n'.encode(enc))
        r = _invoke("annotate", str(gemma_path), str(p), "--spec", SPEC, "--on-error", "skip")
        recs = [json.loads(x) for x in r.stdout.splitlines()]
        assert recs and all("error" in x for x in recs), (enc, recs)
        assert any("UTF-8" in x["error"]["message"] for x in recs)
    # CSV: quoted fields with newlines are one record, reported at the line where it starts
    p = tmp_path / "multi.csv"
    p.write_text('id,text\na1,"first line\nsecond line"\na2,""\na3,plain\n')
    r = _invoke("annotate", str(gemma_path), str(p), "--spec", SPEC, "--on-error", "skip")
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x.get("id") for x in recs] == ["a1", "a2", "a3"]
    assert "labels" in recs[0] and recs[1]["error"]["line"] == 4 and recs[1]["error"]["field"] == "text"


def test_human_labels_outside_the_spec_exit_naming_file_line_and_field(tmp_path: Path) -> None:
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"id": "a", "labels": {"Valence": 3, "Arousal": 3, "Dominance": 3}}) + "\n")
    human = tmp_path / "human.jsonl"
    human.write_text(json.dumps({"id": "a", "text": "t", "labels": {"Valence": 3}}) + "\n"
                     + json.dumps({"id": "a", "text": "t", "labels": {"Valence": 7}}) + "\n")
    r = CliRunner().invoke(cli, ["agree", str(pred), str(human), "--spec", SPEC])
    assert r.exit_code == 1
    assert f"{human}:2:" in r.stderr and "labels.Valence" in r.stderr and "outside the scale" in r.stderr


# -- a real run killed with -9 at a random point -------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_a_random_point_then_resume_equals_an_uninterrupted_run(tmp_path: Path, gemma_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    # 80 items: more than the 2 s after the first record at which the kill may land
    inp.write_text("".join((DATA / "emobank-test-200.jsonl").read_text().splitlines(keepends=True)[:80]))
    ref = tmp_path / "ref.jsonl"
    args = [str(gemma_path), str(inp), "--spec", SPEC, "--threads", "2"]
    assert _invoke("annotate", *args, "-o", str(ref)).exit_code == 0
    out = tmp_path / "out.jsonl"
    point = random.Random(os.getpid()).uniform(0.0, 2.0)  # seconds after the first record: a new point each run
    proc = subprocess.Popen([*CLI, "annotate", *args, "-o", str(out)], stderr=subprocess.DEVNULL)
    while not (out.exists() and out.stat().st_size) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(point)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(out.read_bytes().split(b"\n")) - 1
    assert proc.returncode == -signal.SIGKILL and 0 < done < 80, (point, done)
    r = subprocess.run([*CLI, "annotate", *args, "-o", str(out), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref.read_bytes(), f"killed {point:.2f}s after the first record, {done} done"


# -- model files ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_spec_whose_answers_are_not_distinct_tokens_is_refused_before_any_work(tmp_path: Path,
                                                                             gemma_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(textwrap.dedent("""\
        name: bad
        inputs: [text]
        templates: ["Rate the text.\\n{rubric}"]
        criteria:
          - name: q
            level: ordinal
            scale: [{value: 1, anchor: low}, {value: 12, anchor: high}]
        """))
    out = tmp_path / "o.jsonl"
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(_good(0)) + "\n")
    r = _invoke("annotate", str(gemma_path), str(inp), "--spec", str(spec), "-o", str(out))
    assert r.exit_code == 1 and "do not tokenize to distinct tokens" in r.stderr
    assert not out.exists(), "refused before any output was opened"


# -- no chat template rendered, no path from a model file used -----------------------------------
@pytest.mark.slow
def test_chat_template_and_metadata_paths_are_inert(tmp_path: Path, gemma_path: Path) -> None:
    from edge_annotator.export.metadata import embed_spec

    trap = tmp_path / "rendered-a-template"
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    evil = ("{{ cycler.__init__.__globals__.os.system('touch " + str(trap) + "') }}"
            "{% for m in messages %}{{ m.content }}{% endfor %}")
    model = embed_spec(gemma_path, tmp_path / "evil.gguf", SPEC_OBJ,
                       {"base_model": str(secret), "merged_dir": str(tmp_path / "merged"), "train_data": str(secret)},
                       extra={"tokenizer.chat_template": evil})
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(_good(0)) + "\n")
    code = textwrap.dedent(f"""
        import sys
        opened = []
        sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == "open" else None)
        from edge_annotator.runtime.cli import cli
        for argv in (["annotate", {str(model)!r}, {str(inp)!r}, "-o", {str(tmp_path / 'o.jsonl')!r}],
                     ["inspect", {str(model)!r}, "--json"]):
            try:
                cli(argv, standalone_mode=False)
            except SystemExit as e:
                assert not e.code, e.code
        bad = [p for p in opened if {str(secret)!r} in p or {str(tmp_path / 'merged')!r} in p]
        assert not bad, bad
        assert {str(inp)!r} in opened, "the audit hook sees the files the job does open"
        from edge_annotator.runtime.engine import LlamaModel
        assert LlamaModel({str(model)!r}).meta("tokenizer.chat_template") == {evil!r}, "the trap is armed"
        print("INERT")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "INERT" in r.stdout, r.stderr[-2000:]
    assert not trap.exists(), "the chat template was rendered"
    # the runtime has no code path that renders one: neither llama.cpp's nor jinja (report.py's jinja
    # renders its own fixed page, PAGE, and nothing else)
    for path in (ROOT / "runtime").glob("*.py"):
        src = path.read_text()
        assert "chat_template" not in src.replace("tokenizer.chat_template", "") or path.name == "gguf_meta.py"
        assert "create_chat_completion" not in src and "apply_template" not in src
        if path.name == "report.py":
            assert src.count("from_string(") == 1 and ".from_string(PAGE)" in src and "Template(" not in src
        else:
            assert "jinja" not in src.lower(), path.name


# -- offline: every stage with the network blocked -----------------------------------------------
NO_NETWORK = textwrap.dedent("""
    # sitecustomize for the offline test: every Python process (the converter too) loses the network
    import socket
    def _blocked(*a, **k):
        raise OSError("edge-annotator offline test: network access attempted")
    _connect = socket.socket.connect
    def _connect_local_only(self, addr):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _blocked()
        return _connect(self, addr)
    socket.socket.connect = _connect_local_only
    socket.socket.connect_ex = _connect_local_only
    socket.create_connection = _blocked
    socket.getaddrinfo = _blocked
""")


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, gemma_hf: Path) -> dict:
    import yaml

    tmp = tmp_path_factory.mktemp("offline")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(base_model=str(gemma_hf), spec=SPEC, train_data=str(DATA / "emobank-train-64.jsonl"),
               output=str(tmp / "run"), max_steps=4, eval_every=2, val_max_items=6)
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(raw))
    inp = tmp / "in.jsonl"
    inp.write_text("".join(EMOBANK.read_text().splitlines(keepends=True)[:4]))
    steps = [
        ["annotate", str(gemma_path), str(inp), "--spec", SPEC, "-o", str(tmp / "zero.jsonl")],
        ["agree", str(tmp / "zero.jsonl"), str(inp), "--spec", SPEC],
        ["train", str(tmp / "tiny.yaml")],
        ["export", str(tmp / "run" / "merged"), "-o", str(tmp / "tiny.gguf"), "--quant", "Q8_0"],
        ["parity", str(tmp / "run" / "merged"), str(tmp / "tiny.gguf"), str(EMOBANK), "--max-items", "4"],
    ]
    env = {**os.environ, "PYTHONPATH": str(tmp / "site"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('example.com', 80))"],
                           env=env, capture_output=True, text=True)
    results = {"probe": probe}
    for argv in steps:
        results[argv[0]] = subprocess.run([*CLI, *argv], env=env, capture_output=True, text=True, timeout=900)
    return {"results": results, "gguf": tmp / "tiny.gguf"}


@pytest.mark.slow
def test_offline_every_stage_runs_with_the_network_blocked(offline_run: dict) -> None:
    res = offline_run["results"]
    assert "network access attempted" in res["probe"].stderr  # the block is in force in child processes
    for name in ("annotate", "agree", "train", "export", "parity"):
        r = res[name]
        assert r.returncode == 0, f"{name} failed offline:\n{r.stderr[-3000:]}"
        assert "network access attempted" not in r.stderr, name


# -- load: 100,000 items in bounded memory -------------------------------------------------------
def _rss_kb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _run_sampled(model: Path, inp: Path, out: Path, n: int) -> tuple[int, list[tuple[int, int]]]:
    """Annotate INP in a child process: its peak RSS (kB: VmHWM, sampled every second until it
    exits; wait4's ru_maxrss would carry the forking pytest's size) and (records written, RSS kB)."""
    proc = subprocess.Popen([*CLI, "annotate", str(model), str(inp), "-o", str(out), "--threads", "2"],
                            stderr=subprocess.DEVNULL)
    samples: list[tuple[int, int]] = []
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, _rss_kb(proc.pid, "VmHWM"))
            with out.open("rb") as fh:
                done = sum(buf.count(b"\n") for buf in iter(lambda: fh.read(1 << 20), b""))
            samples.append((done, _rss_kb(proc.pid)))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(1)
    assert proc.returncode == 0
    assert sum(1 for _ in out.open("rb")) == n
    return peak, samples


# Items carry a 2 KB field the prompt does not read, so that a job which held its input (18 MB more
# at 10,000 items than at 1,000) or its output records (4.7 MB more as bytes, several times that as
# objects) would pass the 4 MB bound, as plainly as 100,000 bare items (6.5 MB in) would, in a tenth
# of the time (EDGE_ANNOTATOR_LOAD_ITEMS sets the count; 100000 for the full-size run)
LOAD_ITEMS = int(os.environ.get("EDGE_ANNOTATOR_LOAD_ITEMS", "10000"))


@pytest.mark.slow
def test_a_long_job_streams_in_bounded_memory(offline_run: dict, tmp_path: Path) -> None:
    """Peak RSS of an N-item job equals an N/10-item job's: input and output stream."""
    model = offline_run["gguf"]
    n = LOAD_ITEMS
    words = "calm happy sad angry bored excited tired proud".split()
    rng = random.Random(0)
    big = tmp_path / "big.jsonl"
    with big.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"item-{i:06d}", "text": " ".join(rng.choices(words, k=6)),
                                 "note": "".join(rng.choices("abcdefgh ", k=2000))}) + "\n")
    small = tmp_path / "small.jsonl"
    with big.open() as src, small.open("w") as dst:
        dst.writelines(line for _, line in zip(range(n // 10), src))
    peak_small, _ = _run_sampled(model, small, tmp_path / "small.out", n // 10)
    peak_big, samples = _run_sampled(model, big, tmp_path / "big.out", n)
    early = [rss for done, rss in samples if n // 10 <= done <= n // 5]
    late = [rss for done, rss in samples if done >= n * 9 // 10]
    assert early and late, samples
    report = {"items": [n // 10, n], "peak_rss_mb": [round(peak_small / 1024, 1), round(peak_big / 1024, 1)],
              "rss_mb_at_10_20pct": round(min(early) / 1024, 1), "rss_mb_at_90pct": round(max(late) / 1024, 1),
              "input_mb": round(big.stat().st_size / 2**20, 1),
              "output_mb": round((tmp_path / "big.out").stat().st_size / 2**20, 1)}
    (ROOT / "models").mkdir(exist_ok=True)
    (ROOT / "models" / f"load-{n}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(report)
    # ten times the input, the same peak: what grows is the duplicate-id table (runtime/jobs.py:
    # IdTable, 20 bytes a slot: 0.2 MB at 10,000 ids); holding the input (20 MB at 10,000 items) or
    # the output (5 MB of records) would show as more
    assert peak_big - peak_small < 4 * 1024, report
    assert max(late) - min(early) < 6 * 1024, report


# -- weights: safetensors and GGUF only (the static scan: test_packaging.py) -----------------------
@pytest.mark.slow
def test_a_pickled_checkpoint_is_refused(tmp_path: Path, gemma_hf: Path) -> None:
    """A base folder whose weights are only a pytorch_model.bin (a pickle) does not load."""
    import shutil

    from edge_annotator.train.config import parse_config
    from edge_annotator.train.model import load_base

    base = tmp_path / "base"
    base.mkdir()
    for f in gemma_hf.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, base / f.name)
    (base / "pytorch_model.bin").write_bytes(b"not even read")
    cfg = parse_config({"base_model": str(base), "spec": SPEC, "train_data": str(DATA / "emobank-train-64.jsonl"),
                        "output": str(tmp_path / "run")})
    import torch

    with pytest.raises(OSError, match="safetensors"):
        load_base(cfg, torch.device("cpu"))
