"""How a criterion's head should be built from its candidates: every candidate head (tap, kind,
penalty) of a head cell cross-validated on the cell's items, and on the full test split the single
best by cross-validation, the plain mean of the best 3 / 5 / 10, and the weighted mean forward
selection builds (what `annotate-cli head` and `fit --route head` ship: export/heads.py, choose).

    python scripts/head_route.py --cell emobank-300            # the cell: its items and annotator
    python scripts/head_candidates.py --labelled models/heads/emobank-300-head/train.jsonl \\
        --labelled models/heads/emobank-300-head/val.jsonl --spec tasks/emobank.yaml \\
        --test models/data/emobank-test.jsonl

Each is scored as fit_criterion compares candidates: a rating scale's score by interval alpha
against the raters' mean, a label set's label by nominal alpha against their majority. The states
are read once per run with the base model (items x taps), about 5 minutes for 1,330 EmoBank
sentences on 2 cores; everything after that takes seconds to a minute per criterion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge_annotator.export import heads as H
from edge_annotator.runtime.labels import read_labelled
from edge_annotator.runtime.spec import load_spec

TOP = (1, 3, 5, 10)


def measure(labelled: list[Path], spec_path: Path, test: Path, base: Path, threads: int) -> dict[str, Any]:
    spec = load_spec(spec_path)
    train = [it for f in labelled for it in read_labelled(f, spec, strict=False).items if it.ratings]
    held = [it for it in read_labelled(test, spec, strict=False).items if it.ratings]
    s_train, s_test = H.states_of(base, spec, train, threads), H.states_of(base, spec, held, threads)
    groups = H.context_groups(spec, train)
    out: dict[str, Any] = {}
    for ci, c in enumerate(spec.criteria):
        rows = [i for i, it in enumerate(train) if any(c.name in r for r in it.ratings)]
        trows = [i for i, it in enumerate(held) if any(c.name in r for r in it.ratings)]

        def mine(states: dict[Any, np.ndarray], rows: list[int], ci: int = ci) -> dict[Any, np.ndarray]:
            return {t: (x[rows, ci] if t.per_criterion else x[rows]).astype(np.float64) for t, x in states.items()}

        x_train, x_test = mine(s_train, rows), mine(s_test, trows)
        rated = [[r[c.name] for r in train[i].ratings if c.name in r] for i in rows]
        held_rated = [[r[c.name] for r in held[i].ratings if c.name in r] for i in trows]
        test_mean = H._targets(c, held_rated)[0]
        oof = H.cross_validate(c, x_train, rated, [groups[i] for i in rows])
        ranked = H.ranked(oof)

        def on_test(picked: list[H.Candidate]) -> float | None:
            s, lab = H._predict(c, H.build_head(picked, x_train, oof), x_test)
            return H._cv_alpha(c, s, lab, test_mean, held_rated)

        arms = {f"top {k}": ranked[:k] for k in TOP} | {"forward selection": H.choose(oof, c, rated, H.MEMBERS)}
        out[c.name] = {
            "items": len(rows), "test_items": len(trows), "candidates": len(oof.cands),
            "top": [{"candidate": cd.name, "cv_alpha": oof.cv[cd.name], "test_alpha": on_test([cd])}
                    for cd in ranked[:max(TOP)]],
            "arms": {name: {"cv_alpha": oof.alpha(c, m, rated), "test_alpha": on_test(m),
                            "members": {cd.name: m.count(cd) for cd in dict.fromkeys(m)}}
                     for name, m in arms.items()}}
    return out


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(name: str, res: dict[str, Any]) -> str:
    arms = list(next(iter(res.values()))["arms"])
    lines = [f"| {name} | " + " | ".join(a if a != "top 1" else "single best" for a in arms) + " |",
             "|---" * (len(arms) + 1) + "|"]
    for crit, r in res.items():
        lines.append(f"| {crit} | " + " | ".join(f"{_f(r['arms'][a]['cv_alpha'])} / {_f(r['arms'][a]['test_alpha'])}"
                                                for a in arms) + " |")
    return "\n".join(lines)


@click.command()
@click.option("--labelled", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True, required=True,
              help="The items the heads are fitted on (repeat: train and validation of a head cell).")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--test", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The full test split's ratings.")
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("models/gemma-3-270m-q4_k_m.gguf"), show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every figure here.")
def main(labelled: tuple[Path, ...], spec_path: Path, test: Path, base: Path, threads: int,
         json_out: Path | None) -> None:
    """Cross-validated / test alpha of each way to build a head (see the module's docstring).

    \b
    Examples:
      python scripts/head_candidates.py --labelled models/heads/emobank-300-head/train.jsonl \\
          --labelled models/heads/emobank-300-head/val.jsonl --spec tasks/emobank.yaml \\
          --test models/data/emobank-test.jsonl --json models/heads/emobank-300-candidates.json
    """
    res = measure(list(labelled), spec_path, test, base, threads)
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))
    click.echo(markdown(spec_path.stem, res))


if __name__ == "__main__":
    main()
