"""annotate-cli serve (runtime/serve.py), a real server process on loopback with the real model:
predictions equal annotate + convert's, 200 concurrent requests all answered and none mixed up,
bad requests answered 4xx, a bounded queue, the token, /setup's schema check and the webhook's
labels. Label Studio itself talks to it in `make label-studio-check` (scripts/label_studio_check.py)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA, TASKS

from edge_annotator.runtime.convert import label_studio_config, label_studio_tasks
from edge_annotator.runtime.records import read_predictions
from edge_annotator.runtime.spec import load_spec

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "edge_annotator.runtime.cli"]
SPEC = TASKS / "emobank.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(model: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = _port()
    proc = subprocess.Popen([*CLI, "serve", str(model), "--spec", str(SPEC), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
            try:
                _call(base, "GET", "/health", headers=_auth_from(args))
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(30)


def _auth_from(args: tuple[str, ...]) -> dict[str, str]:
    return {"Authorization": f"Bearer {args[args.index('--token') + 1]}"} if "--token" in args else {}


def _call(base: str, method: str, path: str, body: Any = None, raw: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


def _items(path: Path, n: int) -> list[dict[str, Any]]:
    out = []
    with path.open() as fh:
        for line in fh:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def _annotate_predictions(model: Path, items_file: Path, tmp: Path) -> dict[str, dict[str, Any]]:
    """What annotate + convert --to label-studio make of the same items: prediction by item id."""
    out = tmp / "annotated.jsonl"
    subprocess.run([*CLI, "annotate", str(model), str(items_file), "--spec", str(SPEC), "-o", str(out),
                    "--threads", "2"], check=True, capture_output=True)
    spec = load_spec(SPEC)
    tasks = label_studio_tasks(read_predictions(out, spec), spec)
    return {t["data"]["id"]: t["predictions"][0] for t in tasks}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_200_concurrent_requests_are_all_answered_as_annotate_would(gemma_path: Path, tmp_path: Path) -> None:
    """200 requests of one task each at once, with bad requests among them: every good one answered
    200 with the prediction annotate + convert make of that item (none lost, none another's), every
    bad one 4xx with a JSON error, and the server's memory bounded."""
    items = _items(DATA / "emobank-test-200.jsonl", 200)
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in items))
    want = _annotate_predictions(gemma_path, src, tmp_path)
    bad: list[tuple[bytes, int]] = [
        (b"{not json", 400), (b'{"tasks": []}', 422), (b'{"tasks": "x"}', 422), (b"[1, 2]", 422),
        (json.dumps({"tasks": [{"data": {"id": "a"}}]}).encode(), 422),            # no text field
        (json.dumps({"tasks": [{"data": {"id": "a", "text": "  "}}]}).encode(), 422),  # empty text
        (json.dumps({"tasks": [{"data": {"id": "a", "text": 7.5e300}}]}).encode(), 200),  # a number is text
        (json.dumps({"tasks": [{"data": ["x"]}]}).encode(), 422), (b'{"tasks": [null]}', 422),
        (b"\xff\xfe", 400),
    ]
    with server(gemma_path, "--workers", "2", "--threads", "2", "--max-body", "65536") as (base, proc):
        rss0 = _rss_kb(proc.pid)

        def good(it: dict[str, Any]) -> tuple[str, int, Any]:
            code, body, _ = _call(base, "POST", "/predict", {"tasks": [{"id": 1, "data": it}], "project": "1.1"})
            return it["id"], code, body

        def wrong(case: tuple[bytes, int]) -> tuple[int, int, Any]:
            code, body, _ = _call(base, "POST", "/predict", raw=case[0])
            return case[1], code, body

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(items) + len(bad)) as ex:
            goods = [ex.submit(good, it) for it in items]
            wrongs = [ex.submit(wrong, b) for b in bad]
            answers = [f.result() for f in goods]
            refusals = [f.result() for f in wrongs]
        seconds = time.perf_counter() - t0
        code, body, _ = _call(base, "POST", "/predict", raw=b'{"tasks": [' + b'"x",' * 40000 + b'"x"]}')
        assert code == 413 and "max-body" in body["error"]
        rss1 = _rss_kb(proc.pid)
        _, stats, _ = _call(base, "GET", "/stats")
    assert [c for _, c, _ in answers] == [200] * len(items)
    for item_id, _, body in answers:
        assert body["results"] == [want[item_id]], item_id
    for expected, code, body in refusals:
        assert code == expected and isinstance(body, dict), (expected, code, body)
        if code != 200:
            assert body["error"]
    assert stats["predicted"] == len(items) + 1 and stats["pending"] == 0
    print(f"\n{len(items)} concurrent requests and {len(bad)} bad ones answered in {seconds:.1f} s "
          f"({len(items) / seconds:.1f} items/s); server RSS {rss0 / 1000:.0f} -> {rss1 / 1000:.0f} MB")
    assert rss1 - rss0 < 150_000, f"RSS grew by {(rss1 - rss0) / 1000:.0f} MB over {len(items)} requests"


def test_a_batch_keeps_its_order_and_marks_a_bad_task_in_its_place(gemma_path: Path, tmp_path: Path) -> None:
    items = _items(DATA / "emobank-test-50.jsonl", 12)
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in items))
    want = _annotate_predictions(gemma_path, src, tmp_path)
    tasks: list[Any] = [{"id": i, "data": it} for i, it in enumerate(items)]
    tasks.insert(5, {"id": 99, "data": {"id": "missing-text"}})
    with server(gemma_path, "--workers", "3", "--threads", "2", "--max-chars", "500") as (base, _):
        code, body, _ = _call(base, "POST", "/predict", {"tasks": tasks})
        long_code, long_body, _ = _call(base, "POST", "/predict",
                                        {"tasks": [{"data": {"id": "l", "text": "w " * 400}}]})
    assert code == 200 and len(body["results"]) == len(tasks)
    assert body["results"][5] == {"error": {"task": "missing-text", "field": "tasks[5].data.text",
                                            "message": body["results"][5]["error"]["message"]}}
    assert "missing" in body["results"][5]["error"]["message"]
    got = [r for r in body["results"] if "error" not in r]
    assert got == [want[it["id"]] for it in items]
    assert long_code == 422 and "500" in long_body["errors"][0]["message"]


def test_a_full_queue_answers_503_with_retry_after(gemma_path: Path) -> None:
    items = _items(DATA / "emobank-test-50.jsonl", 40)
    with server(gemma_path, "--workers", "1", "--threads", "2", "--queue", "4") as (base, _):
        with ThreadPoolExecutor(20) as ex:
            res = list(ex.map(lambda k: _call(base, "POST", "/predict",
                                              {"tasks": [{"data": it} for it in items[2 * k:2 * k + 2]]}), range(20)))
    codes = [c for c, _, _ in res]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for c, body, headers in res:
        if c == 503:
            assert headers.get("Retry-After") == "1" and "busy" in body["error"]
        else:
            assert len(body["results"]) == 2


def test_setup_checks_the_projects_labelling_interface(gemma_path: Path) -> None:
    spec = load_spec(SPEC)
    config = label_studio_config(spec)
    with server(gemma_path, "--workers", "1") as (base, _):
        _, health, _ = _call(base, "GET", "/health")
        ok = _call(base, "POST", "/setup", {"project": "1.1", "schema": config})
        lacking = _call(base, "POST", "/setup", {"project": "1.1",
                                                 "schema": config.replace('name="Arousal"', 'name="Energy"')})
        broken = _call(base, "POST", "/setup", {"project": "1.1", "schema": "<View><Text"})
    assert health["status"] == "UP" and health["model_version"] == ok[1]["model_version"]
    assert ok[0] == 200 and len(ok[1]["model_version"]) == 12
    assert lacking[0] == 422 and "Arousal" in lacking[1]["error"]
    assert broken[0] == 422 and "not XML" in broken[1]["error"]


def test_another_address_needs_a_token_and_every_request_carries_it(gemma_path: Path) -> None:
    r = subprocess.run([*CLI, "serve", str(gemma_path), "--spec", str(SPEC), "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "EDGE_ANNOTATOR_TOKEN": ""})
    assert r.returncode == 1 and "--token" in r.stderr, r.stderr
    r = subprocess.run([*CLI, "serve", str(gemma_path), "--spec", str(SPEC), "--retrain-after", "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--labels-out" in r.stderr, r.stderr
    r = subprocess.run([*CLI, "serve", str(gemma_path), "--spec", str(SPEC), "--ctx", "64", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--ctx 64 cannot hold task" in r.stderr, r.stderr
    with server(gemma_path, "--workers", "1", "--token", "s3cret") as (base, _):
        none = _call(base, "GET", "/health")
        wrong = _call(base, "GET", "/health", headers={"Authorization": "Bearer nope"})
        bearer = _call(base, "GET", "/health", headers={"Authorization": "Bearer s3cret"})
        basic = _call(base, "GET", "/health", headers={
            "Authorization": "Basic " + base64.b64encode(b"labelstudio:s3cret").decode()})
    assert none[0] == wrong[0] == 401 and "token" in none[1]["error"]
    assert bearer[0] == basic[0] == 200


def test_the_webhook_writes_annotations_as_human_labels(gemma_path: Path, tmp_path: Path) -> None:
    """Label Studio's ANNOTATION_CREATED events (the shape its webhook sends) become the records
    `train` reads; a cancelled one and other actions are counted, not written."""
    from edge_annotator.runtime.data import read_human

    out = tmp_path / "labels.jsonl"
    task = {"id": 3, "data": {"id": "s1", "text": "What a day!"}}
    ann = {"id": 7, "completed_by": {"id": 1, "email": "expert@example.com"}, "was_cancelled": False,
           "result": [{"from_name": "Valence", "to_name": "text", "type": "rating", "value": {"rating": 4}},
                      {"from_name": "Arousal", "to_name": "text", "type": "rating", "value": {"rating": 2}}]}
    with server(gemma_path, "--workers", "1", "--labels-out", str(out)) as (base, _):
        r1 = _call(base, "POST", "/webhook", {"action": "ANNOTATION_CREATED", "task": task, "annotation": ann})
        r2 = _call(base, "POST", "/webhook", {"action": "ANNOTATION_CREATED", "task": task,
                                              "annotation": {**ann, "was_cancelled": True}})
        r3 = _call(base, "POST", "/webhook", {"action": "TASKS_CREATED", "tasks": [task]})
        r4 = _call(base, "POST", "/webhook", raw=b"[]")
    assert r1[0] == r2[0] == r3[0] == 200 and r4[0] == 422
    assert (r1[1]["labels_written"], r2[1]["labels_written"], r3[1]["labels_written"]) == (1, 0, 0)
    assert r3[1]["counts"] == {"ANNOTATION_CREATED": 2, "TASKS_CREATED": 1}
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs == [{"id": "s1", "text": "What a day!", "rater": "expert@example.com",
                     "labels": {"Valence": 4, "Arousal": 2}}]
    assert read_human(out, load_spec(SPEC))


def test_a_retrain_round_switches_the_model_only_when_its_command_succeeds(gemma_path: Path, tmp_path: Path) -> None:
    """--retrain-after 2: two webhook labels start the command on --retrain-with's labels plus the new
    ones; here the command is embed-spec (a real, quick command that writes another annotator file;
    fit itself is tested in test_fit.py). Once it exits 0 the server answers with the new file; a
    round whose command fails keeps the model it had."""
    from edge_annotator.runtime.data import read_human

    spec = load_spec(SPEC)
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text(json.dumps({"id": "e1", "text": "Fine.", "rater": "r1", "labels": {"Valence": 3}}) + "\n")
    make = f"{sys.executable} -m edge_annotator.runtime.cli embed-spec {gemma_path} {{spec}} {{output}}"

    def event(i: int) -> dict[str, Any]:
        return {"action": "ANNOTATION_CREATED", "task": {"id": i, "data": {"id": f"s{i}", "text": f"Day {i}."}},
                "annotation": {"completed_by": {"email": "x@example.com"}, "result": [
                    {"from_name": "Valence", "to_name": "text", "type": "rating", "value": {"rating": 4}}]}}

    def wait_round(base: str, k: int) -> dict[str, Any]:
        for _ in range(600):
            st = _call(base, "GET", "/stats")[1]
            rounds = st["retrain"]["rounds"]
            if len(rounds) >= k and rounds[k - 1]["state"] != "running":
                return st
            time.sleep(0.2)
        raise AssertionError(f"round {k} did not end: {st}")

    task = {"tasks": [{"data": {"id": "q", "text": "What a day!"}}]}
    labels = tmp_path / "labels.jsonl"
    with server(gemma_path, "--workers", "1", "--labels-out", str(labels), "--retrain-after", "2",
                "--retrain-with", str(earlier), "--retrain-command", make) as (base, _):
        v0 = _call(base, "GET", "/health")[1]["model_version"]
        before = _call(base, "POST", "/predict", task)[1]
        _call(base, "POST", "/webhook", event(1))
        assert _call(base, "GET", "/stats")[1]["retrain"]["rounds"] == []  # one label: not yet
        _call(base, "POST", "/webhook", event(2))
        st = wait_round(base, 1)
        after = _call(base, "POST", "/predict", task)[1]
        health = _call(base, "GET", "/health")[1]
    rnd = st["retrain"]["rounds"][0]
    assert rnd["state"] == "serving" and rnd["returncode"] == 0, rnd
    assert health["model_version"] == rnd["model_version"] != v0 and health["model"] == "annotator.gguf"
    assert before["results"][0]["model_version"] == v0 and after["results"][0]["model_version"] == rnd["model_version"]
    # the same weights under another file: the same labels, probabilities and scores
    assert after["results"][0]["result"] == before["results"][0]["result"]
    trained_on = read_human(Path(rnd["dir"]) / "labels.jsonl", spec)
    assert sorted(trained_on) == ["e1", "s1", "s2"]

    with server(gemma_path, "--workers", "1", "--labels-out", str(tmp_path / "l2.jsonl"), "--retrain-after", "1",
                "--retrain-command", f"{sys.executable} -c 'import sys; sys.exit(3)'") as (base, _):
        _call(base, "POST", "/webhook", event(1))
        st = wait_round(base, 1)
        still = _call(base, "POST", "/predict", task)[1]
    assert st["retrain"]["rounds"][0]["state"] == "failed" and st["retrain"]["rounds"][0]["returncode"] == 3
    assert st["model_version"] == v0 and still["results"][0]["model_version"] == v0
