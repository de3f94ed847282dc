"""annotate-cli agree --report: report.json and a self-contained report.html, the same bytes for
the same inputs and seed, rendered by a real browser (headless Chromium, where installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, TASKS
from golden import GOLDEN

from edge_annotator.runtime.cli import cli

PRED = GOLDEN / "annotate-emobank-test-50.jsonl"
HUMANS = DATA / "emobank-test-50.jsonl"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(out: Path, seed: int = 0) -> None:
    r = CliRunner().invoke(cli, ["agree", str(PRED), str(HUMANS), "--spec", str(TASKS / "emobank.yaml"),
                                 "--report", str(out), "--seed", str(seed)], catch_exceptions=False)
    assert r.exit_code == 0, r.output


def test_report_holds_every_figure_with_intervals_and_repeats_byte_for_byte(tmp_path: Path) -> None:
    _report(tmp_path / "a")
    _report(tmp_path / "b")
    for name in ("report.json", "report.html"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [c["criterion"] for c in rep["criteria"]] == ["Valence", "Arousal", "Dominance"]
    agree_json = json.loads(CliRunner().invoke(cli, ["agree", str(PRED), str(HUMANS), "--spec",
                                                     str(TASKS / "emobank.yaml"), "--json"]).stdout)
    for c, a in zip(rep["criteria"], agree_json["criteria"]):
        assert c["items"] == 50
        for key, want in (("label_alpha", a["alpha"]), ("score_alpha", a["score_alpha"]),
                          ("humans_alpha", a["alpha_humans"]),
                          ("humans_plus_model_alpha", a["alpha_humans_plus_model"])):
            assert c[key] == pytest.approx(want, abs=1e-6), key  # the same alpha agree prints
            lo, hi = c[key + "_ci"]
            assert lo < c[key] < hi, key
        assert sum(map(sum, c["confusion"]["counts"])) == 50
        assert 0 <= c["reliability"]["ece"] <= 1 and sum(b["count"] for b in c["reliability"]["bins"]) == 250
        assert len(c["disagreements"]) == 10 and c["disagreements"][0]["text"]
        assert len(c["scatter"]["score"]) == 50
        tr = c["trust"]  # the share labelled alone grows as the threshold falls, to every item
        shares = [x["share"] for x in tr["curve"]]
        assert shares == sorted(shares) and shares[-1] == 1.0 and tr["curve"][-1]["disagree"] == tr["disagree_all"]
        assert [x["target"] for x in tr["targets"]] == [0.05, 0.1, 0.2] and "At 10% disagreement" in tr["sentence"]
        for x in tr["targets"]:  # the rate on the items it was fitted on never exceeds the bound
            assert x["threshold"] is None or x["disagree"] <= x["bound"] <= x["target"]
    _report(tmp_path / "c", seed=1)
    other = json.loads((tmp_path / "c" / "report.json").read_text())
    assert other["criteria"][0]["label_alpha_ci"] != rep["criteria"][0]["label_alpha_ci"]
    html = (tmp_path / "a" / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 12 and "http" not in html.split("<script>")[0]
    assert html.count("Which labels to trust without review") == 3


def test_a_report_replaces_nothing_it_did_not_make_without_force(tmp_path: Path) -> None:
    """A --report folder already holding a report (or any file of those names) is refused in one line
    before any work, the file untouched; --force replaces both; an input is never written over."""
    spec = ["--spec", str(TASKS / "emobank.yaml")]
    out = tmp_path / "review"
    out.mkdir()
    (out / "report.html").write_text("the team's notes")
    r = CliRunner().invoke(cli, ["agree", str(PRED), str(HUMANS), *spec, "--report", str(out)])
    assert r.exit_code == 1 and f"{out / 'report.html'} exists; pass --force" in r.output, r.output
    assert (out / "report.html").read_text() == "the team's notes" and not (out / "report.json").exists()
    r = CliRunner().invoke(cli, ["agree", str(PRED), str(HUMANS), *spec, "--report", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["criteria"] and "<html" in (out / "report.html").read_text()
    assert not [p.name for p in out.iterdir() if p.name not in ("report.json", "report.html")]  # no leftovers
    humans = tmp_path / "report.json"  # the human labels under the name the report would take
    shutil.copy(HUMANS, humans)
    r = CliRunner().invoke(cli, ["agree", str(PRED), str(humans), *spec, "--report", str(tmp_path), "--force"])
    assert r.exit_code == 1 and "is also an input of the command" in r.output, r.output
    assert humans.read_bytes() == HUMANS.read_bytes()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_chromium_renders_the_report_and_its_images(tmp_path: Path) -> None:
    _report(tmp_path)
    page = (tmp_path / "report.html").as_uri()
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert 'data-images-rendered="12/12"' in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1100,1400", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a page with plots, not a blank one
