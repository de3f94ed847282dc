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

from edge_annotator.runtime.records import read_predictions
from edge_annotator.runtime.spec import load_spec
from edge_annotator.runtime.tool_formats import label_studio_config, label_studio_tasks

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "edge_annotator.runtime.cli"]
SPEC = TASKS / "emobank.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(model: Path, *args: str, spec: Path | None = SPEC) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """annotate-cli serve MODEL on a free loopback port (SPEC None: the model's embedded spec)."""
    port = _port()
    proc = subprocess.Popen([*CLI, "serve", str(model), *(["--spec", str(spec)] if spec else []),
                             "--port", str(port), *args],
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
        (b'{"tasks": [{"data": {"id": ' + b"9" * 5000 + b', "text": "x"}}]}', 400),  # past the JSON bounds
        (b"[" * 60_000, 400),
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


# -- a browser on the same machine, and other hostile callers ----------------------------------------

def _port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _annotation(text: Any = "What a day!") -> dict[str, Any]:
    return {"action": "ANNOTATION_CREATED", "task": {"id": 3, "data": {"id": "s1", "text": text}},
            "annotation": {"completed_by": {"email": "expert@example.com"}, "result": [
                {"from_name": "Valence", "to_name": "text", "type": "rating", "value": {"rating": 4}}]}}


def test_a_page_in_the_users_browser_cannot_write_labels_or_use_the_server(gemma_path: Path, tmp_path: Path) -> None:
    """What a page of another site can send to a loopback server: a 'simple' cross-site POST
    (text/plain, its own Origin), or the same after rebinding its domain name to 127.0.0.1 (its
    Host). Each is refused and writes nothing; Label Studio's own requests (JSON, a loopback Host,
    no Origin) and an allowed origin's go through."""
    out = tmp_path / "new" / "folder" / "labels.jsonl"  # a folder that does not exist yet: made at start
    allowed = "http://labelstudio.example:8080"
    with server(gemma_path, "--workers", "1", "--labels-out", str(out), "--allow-origin", allowed,
                "--allow-host", "host.docker.internal") as (base, _):
        port = _port_of(base)
        event = json.dumps(_annotation()).encode()
        evil = {"Origin": "http://evil.example", "Host": f"evil.example:{port}"}
        refused = {
            "browser-shaped": _call(base, "POST", "/webhook", raw=event,
                                    headers={**evil, "Content-Type": "text/plain"}),
            "rebinding": _call(base, "POST", "/webhook", raw=event, headers={"Host": f"evil.example:{port}"}),
            "cross-site": _call(base, "POST", "/webhook", raw=event, headers={"Origin": "http://evil.example"}),
            "null origin": _call(base, "POST", "/webhook", raw=event, headers={"Origin": "null"}),
            "text/plain": _call(base, "POST", "/webhook", raw=event, headers={"Content-Type": "text/plain"}),
            "form": _call(base, "POST", "/webhook", raw=event,
                          headers={"Content-Type": "application/x-www-form-urlencoded"}),
            "predict rebinding": _call(base, "POST", "/predict", {"tasks": [{"data": {"id": "a", "text": "x"}}]},
                                       headers={"Host": f"attacker.example:{port}"}),
            "health rebinding": _call(base, "GET", "/health", headers={"Host": f"attacker.example:{port}"}),
            "list as text": _call(base, "POST", "/webhook", _annotation(["not", "text"])),
            "NUL in text": _call(base, "POST", "/webhook", _annotation("a NUL \x00 inside")),
        }
        written_after_refusals = out.read_bytes()
        ok = {
            "label studio": _call(base, "POST", "/webhook", _annotation()),
            "localhost": _call(base, "GET", "/health", headers={"Host": f"localhost:{port}"}),
            "ipv6 loopback": _call(base, "GET", "/health", headers={"Host": f"[::1]:{port}"}),
            "allowed host": _call(base, "GET", "/health", headers={"Host": f"host.docker.internal:{port}"}),
            "allowed origin": _call(base, "POST", "/webhook", _annotation(), headers={"Origin": allowed}),
        }
        _, stats, _ = _call(base, "GET", "/stats")
    codes = {k: v[0] for k, v in refused.items()}
    assert codes == {"browser-shaped": 403, "rebinding": 403, "cross-site": 403, "null origin": 403,
                     "text/plain": 415, "form": 415, "predict rebinding": 403, "health rebinding": 403,
                     "list as text": 422, "NUL in text": 422}, codes
    assert all(isinstance(v[1], dict) and v[1]["error"] for v in refused.values())
    assert "must be text" in refused["list as text"][1]["error"] and "NUL" in refused["NUL in text"][1]["error"]
    assert written_after_refusals == b""
    assert {k: v[0] for k, v in ok.items()} == dict.fromkeys(ok, 200)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs == [{"id": "s1", "text": "What a day!", "rater": "expert@example.com", "labels": {"Valence": 4}}] * 2
    assert stats["labels_written"] == 2 and stats["predicted"] == 0


def test_the_body_limit_holds_for_chunked_bodies_and_a_request_past_the_queue_is_413(gemma_path: Path) -> None:
    """A chunked body never says its length: reading stops at --max-body and the answer is 413,
    while the client is still sending 150 MB; the server's memory does not grow with it."""
    import select

    with server(gemma_path, "--workers", "1", "--max-body", "65536", "--queue", "8") as (base, proc):
        rss0 = _rss_kb(proc.pid)
        port = _port_of(base)
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        sent, reply = 0, b""
        try:
            while sent < 150 << 20 and not reply:
                sock.sendall(chunk)
                sent += 1 << 20
                if select.select([sock], [], [], 0)[0]:
                    reply = sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not reply:
            reply = sock.recv(65536)
        sock.close()
        rss1 = _rss_kb(proc.pid)
        many = _call(base, "POST", "/predict", {"tasks": [{"data": {"id": f"t{i}", "text": "x"}} for i in range(9)]})
        alive = _call(base, "GET", "/health")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"max-body 65536" in reply and sent < 150 << 20, (sent, reply[-200:])
    assert rss1 - rss0 < 50_000, f"RSS grew by {(rss1 - rss0) / 1000:.0f} MB while {sent >> 20} MB were sent"
    assert many[0] == 413 and "--queue 8" in many[1]["error"] and "Retry-After" not in many[2]
    assert alive[0] == 200


def test_serve_checks_its_options_and_address_before_it_says_it_serves(gemma_path: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "ratings.csv"
    csv_file.write_text("id,text,Valence\ns1,Fine.,3\n")
    other = tmp_path / "notes.jsonl"
    other.write_text('{"note": "my own file"}\n')
    cases = {
        "labels over a CSV": (["--labels-out", str(csv_file)], "give a .jsonl file"),
        "labels over another file": (["--labels-out", str(other)], "holds something other than human labels"),
        "stray placeholder": (["--labels-out", str(tmp_path / "l.jsonl"), "--retrain-after", "1",
                               "--retrain-command", "annotate-cli fit {spec} {labels} -o {output} --threads "
                                                    "{THREADS}"], "unknown placeholder(s) {THREADS}"),
    }
    for name, (args, needle) in cases.items():
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        r = subprocess.run([*CLI, "serve", str(gemma_path), "--spec", str(SPEC), "--port", "0", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert "serving" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name in before} == before
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([*CLI, "serve", str(gemma_path), "--spec", str(SPEC), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"--port {port}: cannot listen there" in r.stderr, r.stderr
    assert "serving" not in r.stderr and "Traceback" not in r.stderr


def test_retrain_reads_any_label_file_and_a_round_that_raises_lets_the_next_run(gemma_path: Path,
                                                                              tmp_path: Path) -> None:
    """--retrain-with as a CSV (README's ratings.csv): the round's labels are one JSONL file that
    `train` reads, the CSV's ratings and the webhook's. A round that raises inside its thread (here
    its --retrain-with file is gone) is recorded as failed, and the next one runs."""
    from edge_annotator.runtime.data import read_human

    ratings = tmp_path / "ratings.csv"
    ratings.write_text("id,text,rater,Valence,Arousal\ne1,Fine.,r1,3,2\ne1,Fine.,r2,4,\ne2,Dull.,r1,2,2\n")
    ok = f"{sys.executable} -c \"import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])\" {gemma_path} {{output}}"
    labels = tmp_path / "labels.jsonl"

    def wait_round(base: str, k: int) -> dict[str, Any]:
        for _ in range(600):
            st = _call(base, "GET", "/stats")[1]["retrain"]
            if len(st["rounds"]) >= k and st["rounds"][k - 1]["state"] != "running":
                return st["rounds"][k - 1]
            time.sleep(0.2)
        raise AssertionError(f"round {k} did not end")

    with server(gemma_path, "--workers", "1", "--labels-out", str(labels), "--retrain-after", "1",
                "--retrain-with", str(ratings), "--retrain-command", ok) as (base, _):
        _call(base, "POST", "/webhook", _annotation())
        first = wait_round(base, 1)
        kept = ratings.read_bytes()
        ratings.unlink()
        _call(base, "POST", "/webhook", _annotation())
        second = wait_round(base, 2)
        health = _call(base, "GET", "/health")[1]
        ratings.write_bytes(kept)
        _call(base, "POST", "/webhook", _annotation())
        third = wait_round(base, 3)
    assert first["state"] == "serving" and first["labels"] == 4, first
    trained_on = read_human(Path(first["dir"]) / "labels.jsonl", load_spec(SPEC))
    assert trained_on == {"e1": [{"Valence": 3, "Arousal": 2}, {"Valence": 4}], "e2": [{"Valence": 2, "Arousal": 2}],
                          "s1": [{"Valence": 4}]}
    assert second["state"] == "failed" and "ratings.csv" in second["error"] and second["error_id"], second
    assert health["retrain"]["last"]["state"] == "failed" and not health["retrain"]["running"]
    assert third["state"] == "serving" and third["labels"] == 6, third


def test_an_unexpected_error_answers_500_with_an_id_not_its_text(gemma_path: Path) -> None:
    """The app's last handler, on a real server: a route that fails for a reason no request can
    name (here one added to raise) answers 500 with an error id; the exception's text stays in the log."""
    import threading

    import uvicorn

    from edge_annotator.runtime.serve_app import make_app
    from edge_annotator.runtime.serve_gate import Gate
    from edge_annotator.runtime.serve_scorer import Scorer, ServeOptions

    scorer = Scorer(gemma_path, ServeOptions(spec=SPEC, workers=1, threads=1))
    app = make_app(scorer, Gate("127.0.0.1"))

    async def boom() -> None:
        raise RuntimeError("internal detail: /secret/path")

    app.add_api_route("/boom", boom)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        for _ in range(100):
            if srv.started:
                break
            time.sleep(0.1)
        code, body, _ = _call(base, "GET", "/boom")
    finally:
        srv.should_exit = True
        t.join(30)
        scorer.close()
    assert code == 500 and len(body["error_id"]) == 8 and body["error_id"] in body["error"]
    assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
