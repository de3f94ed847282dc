"""--engine ray on a local Ray instance (ray.init(num_cpus=2)): the same records as the local engine,
and an actor killed mid-job costs a retry, not a record.

One Ray instance serves the module (starting one takes seconds); the model is the real Gemma 3 270M
annotator file, so these are `slow`.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_annotator.runtime.cli import cli

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]
EMOBANK = ROOT / "data" / "emobank-test-50.jsonl"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three shards in three formats, with the awkward cases the local reader handles."""
    import pyarrow as pa

    d = tmp_path_factory.mktemp("shards")
    rows = [json.loads(x) for x in EMOBANK.read_text().splitlines()[:22]]
    a = d / "a.jsonl"
    lines = [json.dumps({"id": r["id"], "text": r["text"]}) for r in rows[:10]]
    lines.insert(3, '{"id": "broken", "text": ')            # malformed JSON: an error record
    lines.insert(6, lines[5])                                # the same item again: annotated once
    a.write_text("\n".join(lines) + "\n")
    b = d / "b.csv"
    b.write_text("id,text\n" + "".join(f'{r["id"]},"{r["text"].replace(chr(34), chr(39))}\nsecond line"\n'
                                         for r in rows[10:16]))
    c = d / "c.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in rows[16:22]], "text": [r["text"] for r in rows[16:22]]}), c)
    return [a, b, c]


@pytest.fixture(scope="module")
def local_output(shards: list[Path], annotator_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("local")
    text = ""
    for s in shards:
        out = d / (s.name + ".out.jsonl")
        r = _invoke("annotate", str(annotator_gguf), str(s), "--on-error", "skip", "--threads", "1", "-o", str(out))
        assert r.exit_code == 0, r.output
        text += out.read_text()
    return text


def test_ray_output_equals_local_output(local_ray, shards: list[Path], annotator_gguf: Path, local_output: str,
                                        tmp_path: Path) -> None:
    out = tmp_path / "ray-out"
    r = _invoke("annotate", str(annotator_gguf), *map(str, shards), "--engine", "ray", "--actors", "2",
                "--threads", "1", "--on-error", "skip", "--shard-records", "7", "-o", str(out))
    assert r.exit_code == 0, r.output
    parts = sorted(out.glob("part-*.jsonl"))
    assert len(parts) == -(-local_output.count("\n") // 7)
    got = "".join(p.read_text() for p in parts)
    assert got == local_output  # byte for byte, error records and their file:line included
    assert sum('"error":' in x for x in got.splitlines()) == 1
    man = json.loads((out / "_manifest.json").read_text())
    assert man["records"] == local_output.count("\n") and man["error_records"] == 1
    # the same job into Parquet: one row per record, the record's text unchanged, labels as columns
    outp = tmp_path / "ray-parquet"
    r = _invoke("annotate", str(annotator_gguf), *map(str, shards), "--engine", "ray", "--actors", "1",
                "--threads", "2", "--on-error", "skip", "--format", "parquet", "-o", str(outp))
    assert r.exit_code == 0, r.output
    table = pq.read_table(sorted(outp.glob("part-*.parquet"))[0])
    assert [x + "\n" for x in table.column("record").to_pylist()] == local_output.splitlines(keepends=True)
    first = json.loads(local_output.splitlines()[0])
    assert table.column("label.Valence").to_pylist()[0] == str(first["labels"]["Valence"])
    assert table.column("score.Valence").to_pylist()[0] == first["scores"]["Valence"]


def _actor_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::" in cmd and b"_Scorer" in cmd:
                pids.append(int(p.name))
    return pids


def test_actor_killed_mid_job_is_retried_without_loss_or_duplicates(local_ray, annotator_gguf: Path,
                                                                    tmp_path: Path) -> None:
    from edge_annotator.runtime.gguf_file import sha256_file
    from edge_annotator.runtime.gguf_meta import read_model_info
    from edge_annotator.runtime.ray_job import run_ray_job

    inp = tmp_path / "items.jsonl"
    inp.write_text("".join(line + "\n" for line in EMOBANK.read_text().splitlines()[:40]))
    expected = tmp_path / "expected.jsonl"
    assert _invoke("annotate", str(annotator_gguf), str(inp), "--threads", "1", "-o", str(expected)).exit_code == 0
    spec = read_model_info(annotator_gguf).spec
    assert spec is not None
    seen = [0]
    killed: list[tuple[int, int]] = []  # (pid, records received when it was killed)
    at = random.Random(os.getpid()).randint(2, 30)  # a different point each run, always mid-job

    def progress(n: int) -> None:
        seen[0] += n
        if seen[0] >= at and not killed:  # on the driver, while records are still to come back
            pids = _actor_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], seen[0]))

    man = run_ray_job(annotator_gguf, [str(inp)], tmp_path / "out", spec_json=spec.to_json(),
                      model_sha256=sha256_file(annotator_gguf), actors=2, threads=1, rows_per_batch=2,
                      progress=progress)
    assert killed, "the actor was not killed before the job ended; nothing was tested"
    assert killed[0][1] < 40
    assert man["records"] == 40
    assert (tmp_path / "out" / "part-00000.jsonl").read_text() == expected.read_text()


def test_on_error_fail_stops_the_ray_job_naming_file_and_line(local_ray, shards: list[Path], annotator_gguf: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "ray-fail"
    r = CliRunner().invoke(cli, ["annotate", str(annotator_gguf), *map(str, shards), "--engine", "ray",
                                 "--threads", "1", "-o", str(out)])
    assert r.exit_code == 1
    last = r.stderr.strip().splitlines()[-1]  # Ray logs the worker's stack trace above; ours is the last word
    assert last.startswith("Error: ") and f"{shards[0]}:4:" in last and "malformed JSON" in last, last
    assert not list(out.glob("part-*")), "the input is checked before annotating; nothing half-written"
