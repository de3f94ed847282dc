"""annotate-cli: label text the way your experts do, with one .gguf file, offline.

Thin click commands over library functions. Data goes to stdout as JSONL; progress and logs go
to stderr, so `annotate-cli annotate ... | jq` works. User mistakes end with a one-line message
and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .commands import CLI_MODULE, COMMANDS, load
from .data import InputError
from .options import Command, base_model_option, gpu_layers_option, one_line
from .records import Prediction
from .spec import TaskSpec, load_spec

if TYPE_CHECKING:
    from .jobs import JobOptions, JobStats

err = Console(stderr=True)
log = logging.getLogger("edge_annotator")

class Group(click.Group):
    """annotate-cli: its commands are Command (runtime/options.py: one_line, the one error boundary)."""

    command_class = Command
    group_class = type  # `data` and any other subgroup: a Group too

    def invoke(self, ctx: click.Context) -> Any:
        with one_line():
            return super().invoke(ctx)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="annotate-cli")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv shows llama.cpp's own).")
def cli(verbose: int) -> None:
    """Annotate text with a fine-tuned GGUF annotator, offline and deterministically.

    \b
    Examples:
      annotate-cli annotate annotator.gguf items.jsonl -o labels.jsonl
      annotate-cli annotate base.gguf items.jsonl --spec tasks/emobank.yaml   # zero-shot baseline
      annotate-cli agree labels.jsonl humans.jsonl --spec tasks/emobank.yaml
      annotate-cli inspect annotator.gguf
      annotate-cli convert labels.jsonl --to label-studio --spec tasks/emobank.yaml -o tasks.json
    """
    _setup_logging(verbose)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=err, transient=False)


def _ticker(bar: Progress, task: TaskID, t0: float) -> Callable[[int], None]:
    """Advance the progress bar by n records and show the rate since t0."""

    def tick(n: int) -> None:
        done = bar.tasks[task].completed + n
        dt = time.perf_counter() - t0
        bar.update(task, advance=n, rate=f"{done / dt:.2f} items/s" if dt > 0 else "")

    return tick


@click.command(cls=Command)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", type=click.Path(), default=None,
              help="Write JSONL here instead of stdout (needed for --resume); with --engine ray, a folder.")
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Task spec YAML; overrides the one embedded in MODEL (zero-shot use of a base model).")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="ANNOTATE_THREADS",
              show_envvar=True, help="CPU threads [default: all cores]. Output does not depend on it.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=64), default=2048, show_default=True,
              help="Context window in tokens; longer prompts are rejected per item.")
@gpu_layers_option
@base_model_option
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="fail: stop at the first bad record, naming file, line and field. "
                   "skip: write an error record for it and go on.")
@click.option("--resume", is_flag=True, help="Continue a job whose -o file holds part of the output.")
@click.option("--batch", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Items per llama.cpp decode. Above 1 is faster but probabilities differ slightly "
                   "from the default (see README); labels rarely do.")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Processes, each with its own copy of the model and threads/workers threads; "
                   "output is byte-identical to one worker's.")
@click.option("--max-chars", type=click.IntRange(min=1), default=None,
              help="Reject input fields longer than this many characters.")
@click.option("--engine", "engine_kind", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: annotate many INPUT shards on a Ray cluster (pip install 'edge-annotator[ray]').")
@click.option("--ray-address", default=None, help="An existing Ray cluster (e.g. ray://head:10001) [default: "
              "RAY_ADDRESS, else a local Ray instance on this machine's cores].")
@click.option("--actors", type=click.IntRange(1), default=1, show_default=True,
              help="--engine ray: annotator actors, each with its own model copy and --threads threads.")
@click.option("--format", "out_format", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True,
              help="--engine ray: the output shards' format.")
@click.option("--shard-records", type=click.IntRange(1), default=100_000, show_default=True,
              help="--engine ray: records per output shard.")
@click.option("--dry-run", is_flag=True, help="Print the items, tokens and estimated time (from a timed "
                                              "sample of the first items) and stop; nothing is written.")
def annotate(model: Path, inputs: tuple[str, ...], output: str | None, spec_path: Path | None, threads: int | None,
             n_ctx: int, gpu_layers: int, base_model: Path | None, on_error: str, resume: bool, batch: int,
             workers: int,
             max_chars: int | None, engine_kind: str, ray_address: str | None, actors: int, out_format: str,
             shard_records: int, dry_run: bool) -> None:
    """Label every item of INPUT (JSONL, CSV or Parquet) with MODEL (.gguf).

    For every item and criterion it writes the chosen label (`labels`, the most probable level),
    for rating scales the score (`scores`, the probability-weighted mean of the levels), and the
    probability of every allowed label (`probs`), computed from the model's logits restricted to
    the allowed answers. Output is one JSON record per input record, in input order, each naming
    the model's sha256 and the spec's hash.

    \b
    Examples:
      annotate-cli annotate annotator.gguf items.jsonl > labels.jsonl
      annotate-cli annotate annotator.gguf items.jsonl | jq -c '{id, scores}'
      annotate-cli annotate gemma.gguf data/emobank-test.jsonl --spec tasks/emobank.yaml --threads 2
      annotate-cli annotate annotator.gguf big.csv -o out.jsonl --on-error skip
      annotate-cli annotate annotator.gguf big.csv -o out.jsonl --resume   # after an interrupt
      annotate-cli annotate annotator.gguf big.jsonl --workers 8 --threads 32 > out.jsonl  # many cores
      annotate-cli annotate annotator.gguf big.jsonl --batch 4 > out.jsonl  # faster, not bit-exact
      annotate-cli annotate annotator.gguf shards/*.jsonl --engine ray --actors 8 --threads 4 -o out/
      annotate-cli annotate annotator.gguf replies.csv --dry-run   # how long? (jq-able JSON on stdout)

    A job of more than 200 records first prints what it will process and how long it should take,
    timed on its first 16 items and extrapolated by characters of input.
    """
    from .jobs import Estimate, JobOptions, annotate_file, count_records

    for p in inputs:  # on Ray, a URI (s3://...) is read by the cluster
        if not Path(p).exists() and not (engine_kind == "ray" and "://" in p):
            raise click.ClickException(f"{p}: input file not found")
    options = JobOptions(spec=spec_path, base=base_model, threads=threads, n_ctx=n_ctx, gpu_layers=gpu_layers,
                         batch=batch, workers=workers, on_error=on_error, max_chars=max_chars)  # type: ignore[arg-type]
    if engine_kind == "ray":
        _annotate_ray(model, list(inputs), output, options, resume, ray_address, actors, out_format, shard_records)
        return
    if len(inputs) != 1:
        raise click.UsageError("the local engine annotates one INPUT file; several shards: --engine ray")
    if resume and output in (None, "-"):
        raise click.UsageError("--resume needs -o FILE: a job written to stdout cannot be resumed")
    total = count_records(inputs[0])
    if total == 0:
        raise InputError(inputs[0], None, "holds no records (the file is empty or blank): nothing to annotate")
    if dry_run:
        def show(e: Estimate) -> None:
            err.print(e.line())
            click.echo(json.dumps(e.to_dict()))

        annotate_file(model, inputs[0], None, options, estimated=show, dry_run=True)
        return
    t0 = time.perf_counter()
    bar = _progress()  # shown once the model and the output are ready: a refused model prints one line only
    tick = _ticker(bar, bar.add_task("annotating", total=total, rate=""), t0)
    try:
        stats = annotate_file(model, inputs[0], output, options, resume=resume, progress=tick, started=bar.start,
                              estimated=(lambda e: err.print(e.line())) if total > ESTIMATE_FROM else None)
    finally:
        if bar.live.is_started:
            bar.stop()
    _print_summary(stats, time.perf_counter() - t0)


ESTIMATE_FROM = 200
"""Jobs of more records first print an Estimate (a timed sample: about 2 s of scoring)."""


def _print_summary(stats: JobStats, dt: float) -> None:
    msg = f"{stats.written} annotated in {dt:.1f}s ({stats.written / dt if dt else 0:.2f} items/s"
    if stats.tokens_evaluated:  # counted in this process: not with --workers
        msg += f", {stats.tokens_evaluated / dt:.0f} tokens/s evaluated"
    msg += ")"
    if stats.resumed:
        msg += f", {stats.resumed} already done"
    if stats.duplicates:
        msg += f", {stats.duplicates} repeated rows of the same item"
    if stats.errors:
        msg += f", {stats.errors} error record(s)"
    err.print(msg)
    for m in stats.error_messages:
        err.print(f"  [yellow]skipped[/] {m}", markup=True, highlight=False)


def _annotate_ray(model: Path, inputs: list[str], output: str | None, options: JobOptions, resume: bool,
                  ray_address: str | None, actors: int, out_format: str, shard_records: int) -> None:
    from .gguf_file import sha256_file
    from .jobs import open_model
    from .ray_job import RayJobError, run_ray_job

    if output in (None, "-"):
        raise click.UsageError("--engine ray writes a folder of shards: give -o OUT_DIR")
    if resume or options.batch != 1 or options.workers != 1:
        raise click.UsageError("--engine ray runs the exact path with Ray's own retries: "
                               "--resume, --batch and --workers do not apply")
    # the spec and every model check, on the driver, before Ray starts
    llm, spec = open_model(model, options.spec, base=options.base)
    llm.close()
    t0 = time.perf_counter()
    with _progress() as bar:
        tick = _ticker(bar, bar.add_task("annotating (ray)", total=None, rate=""), t0)
        try:
            man = run_ray_job(model, inputs, output, spec_json=spec.to_json(),
                              model_sha256=sha256_file(model), actors=actors, threads=options.threads or 1,
                              n_ctx=options.n_ctx, on_error=options.on_error, max_chars=options.max_chars,
                              ray_address=ray_address, fmt=out_format, per_shard=shard_records, progress=tick,
                              gpu_layers=options.gpu_layers, base=options.base)
        except (RayJobError, InputError) as e:
            raise click.ClickException(str(e)) from None
    err.print(f"{man['records']} records ({man['error_records']} errors) in {man['seconds']:.1f}s "
              f"({man['records'] / man['seconds']:.2f} records/s) -> {output}/ ({man['shards']} shard(s))")


def _write_report(pred_path: Path, preds: list[Prediction], human: Path, humans: dict[str, Any], spec: TaskSpec,
                  out: Path, seed: int, force: bool) -> None:
    """agree --report: `preds` and `humans` as agree read them; the texts come from HUMAN's rows."""
    from .report import ReportError, report_files

    try:
        err.print(f"report -> {report_files(pred_path, preds, human, humans, spec, out, seed, force=force)}")
    except ReportError as e:
        raise click.ClickException(str(e)) from None


def spec_options(made: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--spec SPEC.yaml or --model MODEL.gguf (its embedded spec), which _spec_for resolves: the
    commands that read annotate's output or files made from it."""
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         help="Or: the annotator .gguf whose embedded spec to use.")(f)
        return click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            help=f"Task spec YAML the {made} were made with.")(f)
    return deco


def _spec_for(spec_path: Path | None, model: Path | None) -> TaskSpec:
    if spec_path:
        return load_spec(spec_path)
    if model:
        from .gguf_meta import embedded_spec

        return embedded_spec(model)
    raise click.UsageError("give --spec SPEC.yaml or --model MODEL.gguf: "
                           "agreement needs the spec's levels of measurement")


force_option = click.option("--force", is_flag=True,
                            help="Replace an existing output file (never one of the command's inputs).")


def _outputs(inputs: list[Path | None], force: bool, *outs: Path | None) -> None:
    """Refuse, before any work, outputs that would lose something: one of the inputs (always), an
    existing file (unless --force), a folder, or two outputs that are one file."""
    from .errors import OutputError
    from .files import check_output, same_file

    given = [o for o in outs if o is not None]
    for i, o in enumerate(given):
        check_output(o, inputs, force)
        for other in given[:i]:
            if o.resolve() == other.resolve() or same_file(o, other):
                raise OutputError(f"{o}: given for two outputs; give each its own file")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


@click.command(cls=Command)
@click.argument("pred", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "fmt", type=click.Choice(["label-studio", "argilla", "csv"]), required=True,
              help="The tool to import into.")
@spec_options("predictions")
@click.option("--items", "items_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The items file annotate read: its texts go into the tasks (without it, ids only).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="label-studio: tasks JSON; argilla: records JSON; csv: the table.")
@click.option("--label-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="label-studio: also write the labelling interface (<View> XML) here.")
@click.option("--settings", "settings_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="argilla: also write the dataset settings (fields, questions) as JSON here.")
@click.option("--accepted-only", is_flag=True, help="Pre-annotate only the labels the annotator's trust rule "
                                                    "accepted (annotate-cli trust); experts fill in the rest.")
@force_option
def convert(pred: Path, fmt: str, spec_path: Path | None, model: Path | None, items_path: Path | None,
            output: Path, label_config: Path | None, settings_path: Path | None, accepted_only: bool,
            force: bool) -> None:
    """Turn annotate's output (PRED) into pre-annotations for Label Studio or Argilla, or a CSV.

    Every record of PRED becomes one task, record or row; error records are kept, flagged with
    their message. docs/formats.md shows each format and the import steps.

    \b
    Examples:
      annotate-cli convert labels.jsonl --to label-studio --model annotator.gguf --items items.jsonl \\
          -o tasks.json --label-config config.xml
      annotate-cli convert labels.jsonl --to argilla --model annotator.gguf --items items.jsonl \\
          -o records.json --settings settings.json
      annotate-cli convert labels.jsonl --to csv --spec tasks/emobank.yaml -o labels.csv
      annotate-cli convert labels.jsonl --to label-studio --model trusted.gguf --items items.jsonl \
          -o tasks.json --accepted-only   # pre-select only what the trust rule accepted
    """
    import csv
    import io

    from . import tool_formats as cv
    from .files import atomic_write
    from .records import read_predictions

    _outputs([pred, items_path, spec_path, model], force, output, label_config if fmt == "label-studio" else None,
             settings_path if fmt == "argilla" else None)
    spec = _spec_for(spec_path, model)
    preds = read_predictions(pred, spec)
    if accepted_only and (fmt == "csv" or not any(p.accept for p in preds)):
        raise click.UsageError("--accepted-only pre-annotates for Label Studio or Argilla the labels a trust rule "
                               "accepted: PRED's records must carry 'accept' (annotate with annotate-cli trust's file)")
    inputs = cv.read_inputs(items_path, spec) if items_path else None
    if fmt == "csv":
        header, rows = cv.csv_rows(preds, spec, inputs)
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        atomic_write(output, buf.getvalue())
    elif fmt == "label-studio":
        atomic_write(output, json.dumps(cv.label_studio_tasks(preds, spec, inputs, accepted_only), indent=1,
                                        ensure_ascii=False))
        if label_config:
            atomic_write(label_config, cv.label_studio_config(spec))
    else:
        name = model.stem if model else spec.name
        shas = {p.model_sha256 for p in preds if p.model_sha256}
        agent = f"edge-annotator/{name}" + (f"@{sorted(shas)[0][:12]}" if len(shas) == 1 else "")
        atomic_write(output, json.dumps(cv.argilla_records(preds, spec, inputs, agent, accepted_only), indent=1,
                                        ensure_ascii=False))
        if settings_path:
            atomic_write(settings_path, json.dumps(cv.argilla_settings(spec), indent=1, ensure_ascii=False))
    errors = sum(p.error is not None for p in preds)
    err.print(f"{len(preds)} records ({errors} error records, flagged) -> {output} ({fmt})")


@click.command("select", cls=Command)
@click.argument("pred", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-n", "--count", type=click.IntRange(1), required=True, help="How many items to pick.")
@click.option("--strategy", type=click.Choice(["entropy", "margin", "spread", "random"]), default="entropy",
              show_default=True, help="What makes an item worth an expert's rating (see below).")
@click.option("--suspect", "human", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Instead: the items of this human-label file whose labels the model contradicts most "
                   "confidently, for review.")
@spec_options("predictions")
@click.option("--criterion", "criteria", multiple=True, help="Only these criteria (repeat) [default: all].")
@click.option("--exclude", "excludes", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Leave out the ids of this file (JSONL or CSV with an 'id'; repeat): items already labelled.")
@click.option("--items", "items_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The items file annotate read: needed by --diverse and --as items.")
@click.option("--diverse", is_flag=True, help="Skip an item whose words overlap an earlier pick's by --overlap.")
@click.option("--overlap", type=click.FloatRange(0, 1, min_open=True), default=0.6, show_default=True,
              help="--diverse's Jaccard share of words that makes two items near-duplicates.")
@click.option("--as", "fmt", type=click.Choice(["picks", "predictions", "items", "csv"]), default="picks",
              show_default=True, help="picks: id, rank, value per line; predictions: PRED's records of the picks "
                                      "(for convert --to label-studio); items: their input records; csv: picks.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here [default: stdout].")
@click.option("--seed", type=int, default=0, show_default=True, help="--strategy random's seed.")
@click.option("--unaccepted", is_flag=True, help="Only items with a label the annotator's trust rule did not accept "
                                                 "(annotate-cli trust): the ones for the experts.")
@force_option
def select_cmd(pred: Path, count: int, strategy: str, human: Path | None, spec_path: Path | None, model: Path | None,
               criteria: tuple[str, ...], excludes: tuple[Path, ...], items_path: Path | None, diverse: bool,
               overlap: float, fmt: str, output: Path | None, seed: int, unaccepted: bool, force: bool) -> None:
    """Which of PRED's items (annotate output) an expert should rate next, most useful first.

    Strategies read the annotator's per-level probabilities: entropy (of the label distribution,
    1 = uniform), margin (1 minus the gap between the two likeliest levels), spread (a rating
    scale's predicted standard deviation over half its range; entropy for label sets), random (a
    seeded hash of the id: the baseline). An item's value is the mean over the criteria; ties go
    by id, so the same predictions give the same picks. With --suspect HUMAN it ranks labelled
    items instead, by how confidently the model contradicts their human consensus.

    \b
    Examples:
      annotate-cli select pool-labels.jsonl -n 100 --model annotator.gguf --exclude train.jsonl > next.jsonl
      annotate-cli select pool-labels.jsonl -n 100 --model annotator.gguf --as predictions -o next-pred.jsonl
      annotate-cli convert next-pred.jsonl --to label-studio --model annotator.gguf --items pool.jsonl -o tasks.json
      annotate-cli select labels.jsonl -n 50 --model annotator.gguf --suspect humans.jsonl --as csv -o review.csv
      annotate-cli select labels.jsonl -n 100000 --model annotator.gguf --unaccepted --as items --items pool.jsonl
    """
    import csv
    import io

    from . import tool_formats as cv
    from .data import iter_rows, read_human, record_id
    from .files import atomic_write
    from .records import jsonl_line, read_predictions
    from .selection import rank, suspects

    _outputs([pred, human, spec_path, model, items_path, *excludes], force, output)
    spec = _spec_for(spec_path, model)
    preds = read_predictions(pred, spec)
    inputs = cv.read_inputs(items_path, spec) if items_path else None
    if fmt == "items" and inputs is None:
        raise click.UsageError("--as items writes the items' input records: give --items ITEMS.jsonl")
    skip: set[str] = set()
    for path in excludes:
        for row in iter_rows(path):
            skip.add(record_id(row, "--exclude reads every record's 'id'"))
    if human is not None and unaccepted:
        raise click.UsageError("--suspect ranks labelled items; --unaccepted picks unlabelled ones: give one")
    if human is not None:
        picks = suspects(preds, read_human(human, spec), spec, count, criteria=criteria or None)
        strategy = "suspect"
    else:
        picks = rank(preds, spec, strategy, count, criteria=criteria or None, exclude=skip, seed=seed,
                     inputs=inputs, diverse=overlap if diverse else None, unaccepted=unaccepted)
    if fmt in ("predictions", "items"):
        src = pred if fmt == "predictions" else items_path
        assert src is not None
        wanted = {p.id for p in picks}
        recs: dict[str, dict[str, Any]] = {}
        for r in iter_rows(src):  # both were read whole above: every record here is good
            if r.data is not None and not (fmt == "predictions" and "error" in r.data) and "id" in r.data \
                    and str(r.data["id"]) in wanted:
                recs.setdefault(str(r.data["id"]), r.data)
        text = "".join(jsonl_line(recs[p.id]) for p in picks)
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        names = [c.name for c in spec.criteria if not criteria or c.name in criteria]
        w.writerow(["id", "rank", "strategy", "value", *names])
        for p in picks:
            w.writerow([p.id, p.rank, strategy, f"{p.value:.6f}", *(f"{p.criteria[k]:.6f}" if k in p.criteria else ""
                                                                    for k in names)])
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(p.record(strategy), ensure_ascii=False) + "\n" for p in picks)
    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write(output, text)
    pool = sum(p.error is None for p in preds) - (0 if human else len(skip & {p.id for p in preds}))
    err.print(f"{len(picks)} of {pool} items picked by {strategy}" + (f" -> {output}" if output else ""))


@click.command(cls=Command)
@click.argument("pred", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("human", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@spec_options("predictions")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write DIR/report.html (figures inline) and DIR/report.json: intervals, confusion, "
                   "calibration, the worst disagreements (pip install 'edge-annotator[report]').")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The bootstrap's seed (intervals of the report and of the leave-one-rater-out figures).")
@click.option("--force", is_flag=True, help="Replace report files already in the --report folder.")
def agree(pred: Path, human: Path, spec_path: Path | None, model: Path | None, as_json: bool,
          report_dir: Path | None, seed: int, force: bool) -> None:
    """Agreement of PRED (annotate output) with HUMAN labels: Krippendorff's alpha and more.

    Per criterion, their mean and pooled: alpha with the human consensus, alpha among the humans
    alone and with the model as one more rater (where items have several raters), exact agreement,
    and macro-F1 (labels) or MAE (scales). For rating scales whose records carry `scores` (the
    probability-weighted mean of the levels), the same for the score beside the label: alpha
    (interval) and MAE against the raters' mean, and alpha with the score as one more rater.

    Where items have two or more raters, the like-for-like yardstick: one held-out human against
    the consensus of the others, beside the model against that same consensus, with 95% bootstrap
    intervals (--seed) and whether the model is above, within or below one human.

    \b
    Examples:
      annotate-cli agree labels.jsonl data/emobank-test.jsonl --spec tasks/emobank.yaml
      annotate-cli agree labels.jsonl humans.csv --model annotator.gguf --json | jq .pooled
      annotate-cli agree labels.jsonl data/emobank-test.jsonl --model annotator.gguf --report review/
    """
    from .data import read_human
    from .metrics import agreement
    from .records import by_id, read_predictions

    if report_dir is not None:  # before any work: a report that could not be written is refused now
        from .report import report_outputs

        report_outputs(report_dir, (pred, human), force)
    spec = _spec_for(spec_path, model)
    records = read_predictions(pred, spec, need_probs=False)  # labels from any tool compare
    labels, all_scores = by_id(records)
    scores = {i: s for i, s in all_scores.items() if s}
    humans = read_human(human, spec)
    report = agreement(spec, labels, humans, scores or None, loo=True, seed=seed)
    report["error_records"] = sum(p.error is not None for p in records)
    if report_dir is not None:
        _write_report(pred, records, human, humans, spec, report_dir, seed, force)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    Console().print(_agreement_table(spec.name, report, bool(scores)))
    if report["error_records"]:
        err.print(f"{report['error_records']} error record(s) in {pred} were left out")
    missing = report["items_predicted"] - report["items_with_humans"]
    if missing:
        err.print(f"{missing} predicted item(s) have no human label in {human}")


def _agreement_table(name: str, report: dict[str, Any], with_scores: bool) -> Table:
    """agree's report as one column per criterion (and pooled) and one row per figure: it fits 80
    columns with scores beside labels, where a column per figure (eleven) squeezed names into ellipses."""
    t = Table(title=f"Agreement with humans: {name}, {report['items_with_humans']} items",
              caption="alpha: Krippendorff's, model vs human consensus; humans: among the raters alone; "
                      "+model: the model as one more rater; label: the most probable level; "
                      "score: the probability-weighted mean of the levels (interval alpha, vs the raters' mean); "
                      "mean: over criteria; pooled units: every (item, criterion) one unit; "
                      "one human: one held-out rater against the others' consensus, beside the model (its score "
                      "where it has one) against that same consensus (like for like; verdict from a 95% interval)")
    heads = {"alpha_humans": "humans", "alpha": "label alpha" if with_scores else "alpha",
             "alpha_humans_plus_model": "label +model" if with_scores else "+model",
             "mae": "label MAE" if with_scores else "MAE", "score_alpha": "score alpha",
             "score_alpha_humans_plus_model": "score +model", "score_mae": "score MAE", "score_r": "score r",
             "exact": "exact", "macro_f1": "macro-F1"}
    cols = report["criteria"] + ([{**report["mean"], "criterion": "mean", "level": ""},
                                   {**report["pooled"], "criterion": "pooled units", "level": ""}]
                                  if len(report["criteria"]) > 1 else [])
    t.add_column("")
    for c in cols:
        t.add_column(c["criterion"], justify="right")
    t.add_row("level", *[c["level"] for c in cols])
    for k, head in heads.items():
        if any(c.get(k) is not None for c in cols):  # only what this spec has
            t.add_row(head, *[_fmt(c.get(k)) for c in cols])
    loo = [c.get("leave_one_out") for c in cols]
    if any(loo):
        t.add_section()
        t.add_row("one human", *[_fmt(x["human_alpha"]) if x else "" for x in loo])
        t.add_row("the model", *[_fmt(x["model_alpha"]) if x else "" for x in loo])
        t.add_row("model is", *[x.get("verdict", "n/a") if x else "" for x in loo])
    return t


@click.command(cls=Command)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.option("--no-hash", is_flag=True, help="Skip the sha256 (slow on multi-GB files).")
@base_model_option
def inspect(model: Path, as_json: bool, no_hash: bool, base_model: Path | None) -> None:
    """Show a GGUF annotator: architecture, quantization, size, sha256, embedded spec, provenance,
    and what this installation's llama.cpp runs it on (CPU only, or with GPU offload).

    \b
    Examples:
      annotate-cli inspect annotator.gguf
      annotate-cli inspect annotator.gguf --json | jq .spec.criteria
    """
    from .engine import backend_info
    from .gguf_file import sha256_file
    from .gguf_meta import read_model_info
    from .linear_head import Head

    info = read_model_info(model, base_model)
    d = info.to_dict(None if no_hash else sha256_file(model))
    d |= _block_info(model)
    d["backend"] = backend_info()  # this installation's llama.cpp, not the file's
    if as_json:
        click.echo(json.dumps(d, indent=2, ensure_ascii=False))
        return
    t = Table(show_header=False, title=str(model))
    for k in ("architecture", "name", "quantization", "context_length", "n_params"):
        t.add_row(k, _fmt(d[k]))
    t.add_row("size", f"{info.size_bytes / 1e6:,.1f} MB")
    if "sha256" in d:
        t.add_row("sha256", d["sha256"])
    if info.spec:
        s = info.spec
        t.add_row("spec", f"{s.name} ({s.kind}), sha256 {s.sha256[:16]}")
        t.add_row("inputs", ", ".join(s.input_names))
        for c in s.criteria:
            how = ""
            if c.head:
                cv = (c.head.get("info") or {}).get("cv_alpha")
                how = (f"; {Head.from_dict(c.head, len(c.scale)).describe()} on the hidden state"
                       + (f" (5-fold alpha {cv:.3f})" if cv else ""))
            t.add_row(f"  {c.name}", f"{c.level}: {', '.join(map(str, c.values))}{how}")
        t.add_row("templates", str(len(s.templates)))
    else:
        t.add_row("spec", info.spec_error or "none embedded (use --spec to annotate zero-shot)")
    for k, v in _blocks(model, d).items():
        t.add_row(k, v)
    t.add_row("provenance", json.dumps(info.provenance) if info.provenance else "none")
    b = d["backend"]
    where = "GPU offload (--gpu-layers)" if b["gpu_offload"] else "CPU only (a GPU build: make install-cuda)"
    t.add_row("backend", f"llama-cpp-python {b['llama_cpp_python']}, {where}")
    c = b["cpu"]
    amx = ("AMX on (crash-prone in VMs: docs/install.md)" if c["amx"] else
           "AMX off" + (" (the CPU has it; the build leaves it out)" if c["cpu_advertises_amx"] else ""))
    t.add_row("cpu kernels", f"{', '.join(c['features']) or 'none'}; {amx}")
    t.add_row("cpu", c["cpu"])
    Console().print(t)


def _block_info(model: Path) -> dict[str, Any]:
    """The blocks' matrices (types, bits/weight) of MODEL, or for a LoRA adapter file, of its factors
    and of the base beside it (where it is there)."""
    from .adapter_file import BASE_SHA256, adapter_fields, base_name
    from .gguf_meta import block_matrices

    kv = adapter_fields(model)
    if kv is None:
        return {"blocks": block_matrices(model)}
    name = base_name(kv)  # a bare name: metadata never names a path to open
    out: dict[str, Any] = {"adapter": {"base_file": name, "base_sha256": kv.get(BASE_SHA256),
                                       "matrices": block_matrices(model)}}
    if name is not None and (model.parent / name).is_file():
        out["blocks"] = block_matrices(model.parent / name)
    return out


def _blocks(model: Path, d: dict[str, Any]) -> dict[str, str]:
    from .gguf_meta import describe_blocks

    rows = {}
    if "adapter" in d:
        a = d["adapter"]
        rows["adapter"] = (f"LoRA over {a['base_file']} (sha256 {str(a['base_sha256'])[:16]}), "
                           + describe_blocks(a["matrices"]).replace(" matrices", " factor matrices"))
    if "blocks" in d:
        rows["blocks" if "adapter" not in d else "base blocks"] = describe_blocks(d["blocks"])
    elif "adapter" in d:
        rows["base blocks"] = f"{d['adapter']['base_file']} is not beside {model.name}"
    return rows


@click.group(cls=Group)
def data() -> None:
    """Human-label files: what one holds, a split by item, one column per rater made rows.

    \b
    Examples:
      annotate-cli data check labels.csv --spec tasks/support.yaml
      annotate-cli data split labels.csv --spec tasks/support.yaml --test 0.2 --val 0.1 -o split/
      annotate-cli data reshape wide.csv --spec tasks/support.yaml -o labels.jsonl
    """


@data.command("check")
@click.argument("labels", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The task spec the labels are for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def data_check(labels: Path, spec_path: Path, as_json: bool) -> None:
    """What LABELS holds: items, ratings, raters per item, each criterion's levels, and the
    humans' own agreement (among themselves, and one held-out rater against the others: the bar
    an annotator is measured against). Warns where a level is never used or one level holds more
    than 90% of the ratings. A file read as nothing stops with one line naming its columns.

    \b
    Examples:
      annotate-cli data check labels.csv --spec tasks/support.yaml
      annotate-cli data check labels.jsonl --spec tasks/support.yaml --json | jq .criteria
    """
    from .labels import check_labels

    got = check_labels(labels, load_spec(spec_path))
    if as_json:
        click.echo(json.dumps(got, indent=2))
        return
    rpi = got["raters_per_item"]
    err.print(f"{labels}: {got['items']} items, {got['ratings']} ratings, raters per item {rpi.get('mean')} "
              f"(min {rpi.get('min')}, max {rpi.get('max')})" + (f", {got['named_raters']} named raters"
                                                                 if got["named_raters"] else ""))
    t = Table(title=f"{got['spec']}: levels and the humans' own agreement")
    t.add_column("criterion")
    t.add_column("ratings", justify="right")
    t.add_column("levels (count)")
    t.add_column("humans' alpha", justify="right")
    t.add_column("one human vs the rest", justify="right")
    for c in got["criteria"]:
        t.add_row(c["criterion"], str(c["ratings"]), " ".join(f"{k}:{n}" for k, n in c["levels"].items()),
                  _fmt(c.get("alpha_humans")), _fmt(c.get("one_human_vs_rest")))
    err.print(t)
    for w in got["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {w}")


@data.command("split")
@click.argument("labels", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for train.jsonl, val.jsonl, test.jsonl and split.json.")
@click.option("--test", type=float, default=0.2, show_default=True, help="Share of items held out for the test.")
@click.option("--val", type=float, default=0.1, show_default=True,
              help="Share for validation (checkpoint choice and early stopping; never the test).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--group", default=None, help="Keep items that share this field's value in one split (e.g. a "
                                            "dialogue id, so that no context is in both train and test).")
@force_option
def data_split(labels: Path, spec_path: Path, out_dir: Path, test: float, val: float, seed: int,
               group: str | None, force: bool) -> None:
    """Split LABELS by item into train, validation and test files, deterministically.

    Every record of an item (one per rater) goes to the same split. With a few hundred items,
    hold out 20% for the test (60 of 300: wide intervals, but a real test) and 10% for
    validation; train on the rest.

    \b
    Examples:
      annotate-cli data split labels.csv --spec tasks/support.yaml -o split/
      annotate-cli data split labels.jsonl --spec S --test 0.25 --val 0.1 --group dialogue_id -o split/
    """
    from .labels import SPLIT_FILES, split_labels

    if not (0 <= test < 1 and 0 <= val < 1 and test + val < 1):
        raise click.BadParameter(f"--test {test} and --val {val}: each must be in [0, 1) and together below 1")
    if out_dir.exists() and not out_dir.is_dir():
        raise click.BadParameter(f"{out_dir} is a file; give a folder", param_hint="-o")
    _outputs([labels, spec_path], force, *(out_dir / f for f in SPLIT_FILES))
    info = split_labels(labels, load_spec(spec_path), out_dir, test, val, seed, group)
    sz = info["sizes"]
    err.print(f"{labels} -> {out_dir}/: train {sz['train']['items']}, val {sz['val']['items']}, "
              f"test {sz['test']['items']} items (seed {seed}{', by ' + group if group else ''})")


@data.command("reshape")
@click.argument("wide", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--pattern", default="{criterion}_{rater}", show_default=True,
              help="How a column name joins criterion and rater, e.g. '{rater}.{criterion}'.")
@force_option
def data_reshape(wide: Path, spec_path: Path, out: Path, pattern: str, force: bool) -> None:
    """One column per rater and criterion (Helpfulness_r1, Helpfulness_r2, ...) to one record per
    rater: {"id", inputs, "rater", "labels"}, the layout train, agree and data check read.

    \b
    Examples:
      annotate-cli data reshape ratings.csv --spec tasks/support.yaml -o labels.jsonl
      annotate-cli data reshape ratings.csv --spec S --pattern '{rater}:{criterion}' -o labels.jsonl
    """
    from .labels import reshape_wide

    _outputs([wide, spec_path], force, out)
    got = reshape_wide(wide, load_spec(spec_path), out, pattern)
    err.print(f"{wide} -> {out}: {got['items']} items, {got['records']} ratings from {len(got['raters'])} raters "
              f"({', '.join(got['raters'][:8])}); columns {', '.join(got['columns'][:6])}"
              + (" ..." if len(got["columns"]) > 6 else ""))


@data.command("import")
@click.argument("export", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--from", "tool", type=click.Choice(["label-studio", "argilla"]), required=True,
              help="label-studio: the project's JSON export; argilla: records as the SDK writes them.")
@spec_options("tasks")
@click.option("--items", "items_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The items file annotate read: a task whose text has changed since is refused.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@force_option
def data_import(export: Path, tool: str, spec_path: Path | None, model: Path | None, items_path: Path | None,
                out: Path, force: bool) -> None:
    """The experts' labels back from a labelling tool as human-label JSONL: one record per
    annotator and item ({"id", inputs, "rater", "labels"}), what train, fit and agree read.
    Cancelled annotations and discarded responses are dropped and counted.

    \b
    Examples:
      annotate-cli data import project-export.json --from label-studio --model annotator.gguf -o labels.jsonl
      annotate-cli data import records.json --from argilla --spec tasks/emobank.yaml --items items.jsonl -o labels.jsonl
    """
    from .feedback import from_argilla, from_label_studio
    from .files import atomic_write
    from .records import jsonl_line
    from .tool_formats import read_inputs

    _outputs([export, spec_path, model, items_path], force, out)
    spec = _spec_for(spec_path, model)
    items = read_inputs(items_path, spec) if items_path else None
    records, counts = (from_label_studio if tool == "label-studio" else from_argilla)(export, spec, items)
    if not records:
        raise click.ClickException(f"{export}: no labels of spec '{spec.name}' ({json.dumps(counts)}); "
                                   f"were the tasks made with this spec?")
    atomic_write(out, "".join(jsonl_line(r) for r in records))
    raters = sorted({r["rater"] for r in records if "rater" in r})
    dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()
                        if k in ("cancelled", "discarded", "without_labels") and v)
    err.print(f"{export} -> {out}: {len(records)} ratings of {len({r['id'] for r in records})} items by "
              f"{len(raters)} rater{'' if len(raters) == 1 else 's'}" + (f"; dropped: {dropped}" if dropped else ""))


@click.command(cls=Command)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--expect-no-amx", is_flag=True,
              help="Fail if the build uses AMX (what make install builds it without).")
def doctor(model: Path, expect_no_amx: bool) -> None:
    """Check this installation's llama.cpp: one real decode of MODEL in a child process.

    A build with AMX kernels crashes at its first decode on many Intel Xeon VMs (SIGSEGV at
    ldtilecfg, llama.cpp PR #26954); this says so in one line, with the remedy, instead of a job
    dying with exit 139. make install runs it after the build.

    \b
    Examples:
      annotate-cli doctor models/gemma-3-270m-q4_k_m.gguf
      annotate-cli doctor annotator.gguf --expect-no-amx
    """
    from .cpu import check

    ok, line = check(model, expect_no_amx=expect_no_amx)
    if not ok:
        raise click.ClickException(line)
    click.echo(line)


def _build() -> None:
    """annotate-cli's commands: runtime/commands.py's table, each loaded, or a stand-in saying what to
    install."""
    for entry in COMMANDS:
        cli.add_command(load(entry, {CLI_MODULE: sys.modules[__name__]}), entry.name)


_build()


def main() -> None:
    cli(prog_name="annotate-cli")


if __name__ == "__main__":
    main()
