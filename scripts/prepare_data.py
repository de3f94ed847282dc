"""Converters from the three public human-annotated datasets to the annotator's JSONL format.

    python scripts/prepare_data.py emobank --source ../shared/data/emobank --split test --limit 50 \
        -o emobank-test.jsonl

Development code, kept out of the package: it made the shipped subsets in data/ and the full
splits `make eval` scores (scripts/eval.py imports `convert`).

- EmoBank (Buechel & Hahn, EACL 2017; CC BY-SA 4.0): one item per sentence, every reader's
  rating of Valence, Arousal and Dominance (1-5) as its own rating. Readers have no ids.
- EmoBank passages (built here from EmoBank; CC BY-SA 4.0): a long two-field item, the passage of
  up to 10 consecutive sentences (about 160 words) of the document a sentence comes from, and the
  sentence, rated as in EmoBank. The readers saw the sentence alone: the passage makes the item
  long (about 250 tokens) without changing its labels, so the annotator must find what to rate in
  it. `context_id` names the passage (split by it; fit --group context_id). The splits are new,
  by passage: a hash of its name puts one in ten in test, one in ten in dev, the rest in train.
  SemEval's headlines, one sentence each, are left out.
- GoEmotions (Demszky et al., ACL 2020; CC BY 4.0): the released labels are aggregated and an item
  may carry several; the spec is single-label, so only items with exactly one label are kept.
- ConvAbuse (Cercas Curry et al., EMNLP 2021; CC BY 4.0): one item per user turn with its
  conversation context, every annotator's abuse severity (1 not abusive .. -3 very strong).
- USR PersonaChat (Mehri & Eskenazi, ACL 2020; no license stated: evaluate with it, never ship
  it): one item per candidate response, with the conversation so far and the persona facts, each
  of its three experts' six ratings; `context_id` names the conversation (split by it). One split,
  "all".

Subsets are drawn with a seeded shuffle, so the same arguments give the same file.
"""

from __future__ import annotations

import csv
import random
import re
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from edge_annotator.runtime.files import atomic_write
from edge_annotator.runtime.records import jsonl_line, write_jsonl_line

DATASETS = ("emobank", "emobank_passages", "goemotions", "convabuse", "usr_personachat")
SOURCES = {"emobank_passages": "emobank"}  # a dataset built from another's release
SPLITS = {"emobank": ("train", "dev", "test"), "emobank_passages": ("train", "dev", "test"),
          "goemotions": ("train", "dev", "test"),
          "convabuse": ("train", "valid", "test"), "usr_personachat": ("all",)}
LICENSES = {
    "emobank": "EmoBank, Buechel & Hahn (EACL 2017), CC BY-SA 4.0",
    "emobank_passages": "EmoBank, Buechel & Hahn (EACL 2017), CC BY-SA 4.0: passages built from its documents",
    "goemotions": "GoEmotions, Demszky et al. (ACL 2020), CC BY 4.0",
    "convabuse": "ConvAbuse, Cercas Curry et al. (EMNLP 2021), CC BY 4.0",
    "usr_personachat": "USR PersonaChat, Mehri & Eskenazi (ACL 2020), no license stated: evaluation only",
}
USR_QUALITIES = ("Understandable", "Natural", "Maintains Context", "Engaging", "Uses Knowledge", "Overall")


def release(root: str | Path, name: str) -> Path:
    """NAME's release folder under ROOT (../shared/data): its own, or the one it is built from."""
    return Path(root) / SOURCES.get(name, name)


def _emobank_ratings(src: Path) -> dict[str, list[dict[str, Any]]]:
    """Every reader's rating of each sentence, by sentence id."""
    ratings: dict[str, list[dict[str, Any]]] = {}
    with (src / "individual_reader_ratings.csv").open(encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            ratings.setdefault(r["id"], []).append(
                {"labels": {"Valence": int(r["V"]), "Arousal": int(r["A"]), "Dominance": int(r["D"])}})
    return ratings


def _emobank(src: Path, split: str) -> Iterator[dict[str, Any]]:
    ratings = _emobank_ratings(src)
    with (src / "emobank.csv").open(encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["split"] == split and r["text"].strip() and r["id"] in ratings:
                yield {"id": r["id"], "text": r["text"], "ratings": ratings[r["id"]]}


PASSAGE_WORDS, PASSAGE_SENTENCES = 160, 10
_SPAN = re.compile(r"(.+)_(\d+)_(\d+)")  # document_start_end: a sentence's characters in its document


def _passage_split(name: str) -> str:
    k = zlib.crc32(name.encode()) % 10
    return "test" if k == 0 else "dev" if k == 1 else "train"


def _emobank_passages(src: Path, split: str) -> Iterator[dict[str, Any]]:
    ratings = _emobank_ratings(src)
    docs: dict[str, list[tuple[int, str, str]]] = {}
    with (src / "emobank.csv").open(encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            m = _SPAN.fullmatch(r["id"])
            if m and r["text"].strip():
                docs.setdefault(m[1], []).append((int(m[2]), r["id"], " ".join(r["text"].split())))
    for doc in sorted(docs):
        sentences = sorted(docs[doc])
        passages: list[list[tuple[int, str, str]]] = [[]]
        for s in sentences:  # greedy: a sentence that would make the passage too long starts the next
            words = sum(len(t.split()) for _, _, t in passages[-1]) + len(s[2].split())
            if passages[-1] and (words > PASSAGE_WORDS or len(passages[-1]) == PASSAGE_SENTENCES):
                passages.append([])
            passages[-1].append(s)
        for p in passages:
            name = f"{doc}@{p[0][0]}"
            if _passage_split(name) != split:
                continue
            text = " ".join(t for _, _, t in p)
            for _, sid, t in p:
                if sid in ratings:
                    yield {"id": sid, "context_id": name, "passage": text, "sentence": t, "ratings": ratings[sid]}


def _goemotions(src: Path, split: str) -> Iterator[dict[str, Any]]:
    names = (src / "emotions.txt").read_text(encoding="utf-8").split()
    with (src / f"{split}.tsv").open(encoding="utf-8", newline="") as fh:
        for text, ids, rid in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            labels = ids.split(",")
            if len(labels) == 1:
                yield {"id": rid, "text": text, "labels": {"emotion": names[int(labels[0])]}}


_SEVERITY = ("1", "0", "-1", "-2", "-3")


def _convabuse(src: Path, split: str) -> Iterator[dict[str, Any]]:
    with (src / f"ConvAbuseEMNLP{split}.csv").open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        raters = sorted({c.split("_")[0] for c in reader.fieldnames or [] if c.startswith("Annotator")},
                        key=lambda a: int(a.removeprefix("Annotator")))
        for r in reader:
            ratings = []
            for a in raters:
                hot = [s for s in _SEVERITY if r.get(f"{a}_is_abuse.{s}", "").strip() in ("1", "1.0")]
                if len(hot) == 1:
                    ratings.append({"rater": a, "labels": {"severity": int(hot[0])}})
            if ratings and r["user"].strip():
                yield {"id": r["example_id"], "prev_agent": r["prev_agent"], "prev_user": r["prev_user"],
                       "agent": r["agent"], "user": r["user"], "ratings": ratings}


def _usr_personachat(src: Path, split: str) -> Iterator[dict[str, Any]]:
    import json

    for k, ctx in enumerate(json.loads((src / "pc_usr_data.json").read_text(encoding="utf-8"))):
        fact = ctx["fact"].replace("your persona: ", "").strip()
        for j, r in enumerate(ctx["responses"]):
            ratings = [{"rater": who, "labels": {q: int(r[q][a]) for q in USR_QUALITIES}}
                       for a, who in enumerate(ctx["annotators"])]
            yield {"id": f"pc-{k:02d}-{j}", "context_id": f"pc-{k:02d}", "context": ctx["context"].strip(),
                   "fact": fact, "response": r["response"].strip(), "system": r["model"], "ratings": ratings}


def convert(name: str, source: str | Path, split: str, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Items of one split, shuffled with `seed` and cut to `limit` if given (items that share a
    context_id stay together)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS[name]:
        raise ValueError(f"{name} has splits {', '.join(SPLITS[name])}, not {split!r}")
    src = Path(source)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: dataset folder not found "
                                f"(expected the {name} release, e.g. ../shared/data/{name})")
    items = list({"emobank": _emobank, "emobank_passages": _emobank_passages, "goemotions": _goemotions,
                  "convabuse": _convabuse, "usr_personachat": _usr_personachat}[name](src, split))
    if limit is not None:  # items that share a context (context_id) are drawn together, whole contexts first
        groups: dict[Any, list[dict[str, Any]]] = {}
        for k, it in enumerate(items):
            groups.setdefault(it.get("context_id", k), []).append(it)
        order = list(groups.values())
        random.Random(seed).shuffle(order)
        items = [it for g in order for it in g][:limit]
    return items


def write_items(items: list[dict[str, Any]], out: Path) -> None:
    """ITEMS as JSONL in OUT, written beside it and renamed into place (never half-written)."""
    atomic_write(out, "".join(jsonl_line(it) for it in items))


def write_rating_rows(items: list[dict[str, Any]], out: Path) -> None:
    """ITEMS as a CSV of one row per rating (the spreadsheet a team keeps): id, the inputs, rater,
    one column per criterion."""
    import io

    inputs = [k for k in items[0] if k not in ("id", "ratings", "labels")]
    crits = list(dict.fromkeys(c for it in items for r in it.get("ratings", [it]) for c in r["labels"]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", *inputs, "rater", *crits])
    for it in items:
        for k, r in enumerate(it.get("ratings", [it])):
            w.writerow([it["id"], *(it[f] for f in inputs), r.get("rater", f"r{k + 1}"),
                        *(r["labels"].get(c, "") for c in crits)])
    atomic_write(out, buf.getvalue())


@click.command()
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The dataset's release folder [default: ../shared/data/DATASET; EmoBank's for emobank_passages].")
@click.option("--split", default="test", show_default=True, help="train, dev/valid or test.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Keep a seeded random subset of this size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write here instead of stdout.")
@click.option("--csv", "as_csv", is_flag=True, help="With -o: a CSV of one row per rating instead of JSONL.")
def main(dataset: str, source: Path | None, split: str, limit: int | None, seed: int, output: str | None,
         as_csv: bool) -> None:
    """Convert a public human-annotated dataset to annotate-cli's JSONL format.

    \b
    Examples:
      python scripts/prepare_data.py emobank --split test --limit 50 -o emobank-test.jsonl
      python scripts/prepare_data.py convabuse --source /data/convabuse --split valid | head
      python scripts/prepare_data.py emobank_passages --split train --limit 400 -o passages.jsonl
      python scripts/prepare_data.py convabuse --split train --limit 300 --csv -o data/convabuse-ratings-300.csv
    """
    src = source or release(Path("..") / "shared" / "data", dataset)
    try:
        items = convert(dataset, src, split, limit, seed)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--split") from None
    if output and as_csv:
        write_rating_rows(items, Path(output))
    elif output:
        write_items(items, Path(output))
    else:
        for it in items:
            write_jsonl_line(sys.stdout, it)
    click.echo(f"{len(items)} {dataset} {split} items" + (f" -> {output}" if output else ""), err=True)


if __name__ == "__main__":
    main()
