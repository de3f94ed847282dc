"""annotate-cli end to end on the real model: output format, determinism, errors, nothing lost."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, TASKS

from edge_annotator.runtime.cli import cli

pytestmark = pytest.mark.slow
SPEC = str(TASKS / "emobank.yaml")


def _sample(tmp_path: Path, n: int, name: str = "in.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((DATA / "emobank-test-50.jsonl").read_text().splitlines(keepends=True)[:n]))
    return p


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_annotate_stdout_is_jsonl_and_thread_count_changes_nothing(tmp_path: Path, gemma_path: Path) -> None:
    inp = _sample(tmp_path, 12)  # item 10 is long: with flash attention on, its scores changed with threads
    r1 = _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "--threads", "1")
    out = str(tmp_path / "o.jsonl")
    r2 = _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "--threads", "2", "-o", out)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert r1.stdout.encode() == (tmp_path / "o.jsonl").read_bytes()
    assert "annotated" in r1.stderr and "items/s" in r1.stderr
    recs = [json.loads(line) for line in r1.stdout.splitlines()]
    assert [r["id"] for r in recs] == [json.loads(line)["id"] for line in inp.read_text().splitlines()]
    sha = hashlib.sha256(gemma_path.read_bytes()).hexdigest()
    from edge_annotator.runtime.spec import load_spec

    for r in recs:
        assert r["model_sha256"] == sha and r["spec_sha256"] == load_spec(SPEC).sha256
        assert set(r["labels"]) == {"Valence", "Arousal", "Dominance"}
        assert list(r) == ["id", "labels", "scores", "probs", "model_sha256", "spec_sha256"]
        for crit, probs in r["probs"].items():
            assert list(probs) == ["1", "2", "3", "4", "5"]
            assert r["labels"][crit] == int(max(probs, key=probs.__getitem__))
            # the score: the probability-weighted mean of the levels (from unrounded probabilities)
            assert r["scores"][crit] == pytest.approx(sum(int(v) * p for v, p in probs.items()), abs=1e-5)
    # agree reads them: score figures beside the label's
    (tmp_path / "pred.jsonl").write_text(r1.stdout)
    rep = json.loads(_invoke("agree", str(tmp_path / "pred.jsonl"), str(inp), "--spec", SPEC, "--json").stdout)
    for c in rep["criteria"] + [rep["pooled"]]:
        assert {"alpha", "mae", "score_alpha", "score_mae", "score_alpha_humans_plus_model"} <= set(c)
    table = _invoke("agree", str(tmp_path / "pred.jsonl"), str(inp), "--spec", SPEC).stdout
    assert "score alpha" in table and "label alpha" in table


def test_embedded_spec_and_inspect(tmp_path: Path, annotator_gguf: Path, gemma_path: Path) -> None:
    inp = _sample(tmp_path, 2)
    r = _invoke("annotate", str(annotator_gguf), str(inp))
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2
    info = json.loads(_invoke("inspect", str(annotator_gguf), "--json").stdout)
    assert info["architecture"] == "gemma3" and info["quantization"] == "Q4_K_M"
    assert info["spec"]["name"] == "emobank" and info["provenance"]["base_model"] == "gemma-3-270m"
    assert info["sha256"] == hashlib.sha256(annotator_gguf.read_bytes()).hexdigest()
    base = json.loads(_invoke("inspect", str(gemma_path), "--json", "--no-hash").stdout)
    assert base["spec"] is None and "sha256" not in base
    # the blocks' matrices of llama.cpp's own Q4_K_M of Gemma 3 270M: rows of 640 force Q5_0 on most
    assert base["blocks"]["matrices"] == 126 and 5.4 < base["blocks"]["bits_per_weight"] < 5.5
    assert set(base["blocks"]["types"]) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert "Q4_K_M" in _invoke("inspect", str(annotator_gguf), "--no-hash").stdout


def test_base_model_without_spec_is_refused(tmp_path: Path, gemma_path: Path) -> None:
    r = _invoke("annotate", str(gemma_path), str(_sample(tmp_path, 1)), "-o", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 1 and "no embedded task spec" in r.stderr and "--spec" in r.stderr
    assert not (tmp_path / "o.jsonl").exists(), "no output is opened before the model is checked"


@pytest.mark.parametrize("content, needle", [
    (None, "model file not found"),                                  # missing
    (b"PK\x03\x04 not a model", "not a GGUF file"),                  # wrong format
    (b"GGUF" + bytes(range(256)) * 4, "could not load this model"),  # corrupt header
])
def test_bad_model_files(tmp_path: Path, content: bytes | None, needle: str) -> None:
    m = tmp_path / "m.gguf"
    if content is not None:
        m.write_bytes(content)
    r = _invoke("annotate", str(m), str(_sample(tmp_path, 1)), "--spec", SPEC)
    assert r.exit_code == 1 and needle in r.stderr and str(m) in r.stderr
    assert "Traceback" not in r.output


def test_truncated_model_is_refused(tmp_path: Path, gemma_path: Path) -> None:
    m = tmp_path / "t.gguf"
    with gemma_path.open("rb") as src:
        m.write_bytes(src.read(gemma_path.stat().st_size // 2))
    r = _invoke("inspect", str(m))
    assert r.exit_code == 1 and "could not load this model" in r.stderr


def _bad_input(tmp_path: Path) -> Path:
    lines = (DATA / "emobank-test-50.jsonl").read_text().splitlines()
    bad = [lines[0], lines[1], json.dumps({"id": "nofield", "sentence": "wrong field name"}), lines[2],
           '{"id": "broken", "text": ', json.dumps({"id": "blank", "text": "  "}), lines[3]]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(bad) + "\n")
    return p


def test_fail_names_file_line_and_field_and_keeps_what_was_written(tmp_path: Path, gemma_path: Path) -> None:
    inp, out = _bad_input(tmp_path), tmp_path / "o.jsonl"
    r = _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "-o", str(out))
    assert r.exit_code == 1
    assert f"{inp}:3: field 'text': missing" in r.stderr
    assert len(out.read_text().splitlines()) == 2, "the two records before the bad one are kept"


def test_skip_writes_error_records_in_order(tmp_path: Path, gemma_path: Path) -> None:
    inp = _bad_input(tmp_path)
    r = _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "--on-error", "skip")
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 7
    errs = {rec["error"]["line"]: rec["error"] for rec in recs if "error" in rec}
    assert sorted(errs) == [3, 5, 6]
    assert errs[3]["field"] == "text" and errs[6]["field"] == "text" and "empty" in errs[6]["message"]
    assert "malformed JSON" in errs[5]["message"]
    assert "3 error record(s)" in r.stderr


def test_text_longer_than_the_context_window(tmp_path: Path, gemma_path: Path) -> None:
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"id": "long", "text": "very long sentence " * 400}) + "\n")
    r = _invoke("annotate", str(gemma_path), str(p), "--spec", SPEC, "--ctx", "512", "--on-error", "skip")
    (rec,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert rec["error"]["field"] == "text" and "context window is 512" in rec["error"]["message"]


def test_a_context_window_smaller_than_the_task_is_refused_before_the_output_is_opened(
        tmp_path: Path, gemma_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(cli, ["annotate", str(gemma_path), str(_sample(tmp_path, 3)), "--spec", SPEC,
                                 "--ctx", "64", "-o", str(out)])
    assert r.exit_code == 1 and "--ctx 64 cannot hold task 'emobank'" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()


def test_resume_after_a_torn_write_matches_an_uninterrupted_run(tmp_path: Path, gemma_path: Path) -> None:
    inp = _sample(tmp_path, 5)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "-o", str(full)).exit_code == 0
    data = full.read_bytes()
    cut = data.index(b"\n", data.index(b"\n") + 1) + 40  # two whole records and a torn third
    part.write_bytes(data[:cut])
    r = _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "-o", str(part))
    assert r.exit_code == 1 and "--resume" in r.stderr, "an existing output is never overwritten"
    r = _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "-o", str(part), "--resume")
    assert r.exit_code == 0, r.output
    assert "2 already done" in r.stderr
    assert part.read_bytes() == data


def test_agree_reports_alpha_per_criterion(tmp_path: Path, gemma_path: Path) -> None:
    inp = _sample(tmp_path, 8)
    out = tmp_path / "o.jsonl"
    _invoke("annotate", str(gemma_path), str(inp), "--spec", SPEC, "-o", str(out))
    r = _invoke("agree", str(out), str(inp), "--spec", SPEC, "--json")
    rep = json.loads(r.stdout)
    assert [c["criterion"] for c in rep["criteria"]] == ["Valence", "Arousal", "Dominance"]
    for c in rep["criteria"]:
        assert c["items"] == 8 and "alpha_humans" in c and "mae" in c
    table = _invoke("agree", str(out), str(inp), "--spec", SPEC).stdout
    assert "Valence" in table and "pooled" in table


def test_workers_and_batch_give_the_same_bytes_as_one_process(tmp_path: Path, gemma_path: Path) -> None:
    lines = (DATA / "emobank-test-50.jsonl").read_text().splitlines(keepends=True)[:9]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(lines[:4]) + '{"id": "bad"}\n' + "".join(lines[4:]))
    base = ["annotate", str(gemma_path), str(inp), "--spec", SPEC, "--on-error", "skip"]
    one = _invoke(*base)
    two = _invoke(*base, "--workers", "2", "--threads", "2")
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    assert one.stdout == two.stdout and len(one.stdout.splitlines()) == 10
    b1 = _invoke(*base, "--batch", "3").stdout
    b2 = _invoke(*base, "--batch", "3", "--workers", "2", "--threads", "2").stdout
    assert b1 == b2, "batched groups are formed in input order, whichever process scores them"
    # a resumed batched job re-forms the same groups, so it ends byte-identical too
    part = tmp_path / "part.jsonl"
    part.write_text("".join(b1.splitlines(keepends=True)[:5]))
    assert _invoke(*base, "--batch", "3", "-o", str(part), "--resume").exit_code == 0
    assert part.read_text() == b1


def test_dry_run_estimates_without_writing_and_a_long_job_prints_its_estimate_first(
        tmp_path: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--dry-run: items, tokens and a time from a timed sample, JSON on stdout, nothing written.
    A job over the threshold prints the same estimate first and still writes the recorded bytes
    (scoring does not depend on what ran before)."""
    from golden import check_golden

    import edge_annotator.runtime.cli as cli_mod

    items = DATA / "emobank-test-50.jsonl"
    out = tmp_path / "never.jsonl"
    r = _invoke("annotate", str(gemma_path), str(items), "--spec", SPEC, "--threads", "2", "--dry-run", "-o", str(out))
    assert r.exit_code == 0, r.output
    est = json.loads(r.stdout)
    assert (est["records"], est["items"], est["sample_items"]) == (50, 50, 16) and not out.exists()
    assert est["tokens"] > 50 * 20 and est["seconds"] > 0 and est["items_per_s"] > 0
    assert "50 items" in r.stderr and "timed on the first 16 items" in r.stderr
    monkeypatch.setattr(cli_mod, "ESTIMATE_FROM", 10)
    r = _invoke("annotate", str(gemma_path), str(items), "--spec", SPEC, "--threads", "2", "-o", str(out))
    assert r.exit_code == 0 and "timed on the first 16 items" in r.stderr, r.output
    check_golden("annotate-emobank-test-50.jsonl", out.read_text())
