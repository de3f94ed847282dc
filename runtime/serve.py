"""`annotate-cli serve`: an annotator as a Label Studio ML backend (FastAPI on uvicorn).

    annotate-cli serve annotator.gguf --port 9090
    # Label Studio: project > Settings > Model > Connect Model, URL http://127.0.0.1:9090

A task's prediction is the one `annotate-cli convert --to label-studio` makes of `annotate`'s record
for the same item: the same labels, scores, confidences and `model_version` (the file's sha256
prefix). Items are scored one at a time (batch 1, annotate's default) by `--workers` threads, each
with its own llama.cpp context over the one loaded model, so a prediction does not depend on the
requests around it. At most `--queue` items wait; past that a request gets 503 with Retry-After
(and one that alone holds more than --queue tasks, 413). A task the spec cannot read (a field
missing, empty, too long) gets `{"error": ...}` in its place of `results`; a request no task of
which can be read gets 422, one that is not JSON 400, one over --max-body bytes 413.

With --retrain-after N (and --labels-out, --spec), every N new labels start --retrain-command
(default `annotate-cli fit SPEC LABELS -o OUT`, which publishes only a file that passed parity) in
the background on --retrain-with's labels plus the new ones (runtime/retrain.py); the old model
answers until the command exits 0 with its file written, then the new one does.

Listens on 127.0.0.1 unless --host says otherwise; another address needs --token, which every
request must then carry (`Authorization: Bearer TOKEN`, or HTTP basic auth with TOKEN as the
password, as Label Studio's "Basic auth" sends it). Who else is refused, and why, is in
runtime/serve_gate.py and docs/serve.md's threat model.

    runtime/serve_scorer.py   options, the loaded model and its workers, a task read and answered
    runtime/serve_gate.py     the gate (token, Host, Origin) and the request body (type, size, JSON)
    runtime/serve_app.py      the routes and the app that puts them behind the gate
    runtime/retrain.py        the webhook's label file and the retrain rounds
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from .errors import UserError
from .serve_app import make_app
from .serve_gate import Gate, is_loopback
from .serve_scorer import DEFAULT_RETRAIN, Scorer, ServeOptions


def _bind(host: str, port: int) -> socket.socket:
    """The listening address taken before anything is announced: a port in use is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def run(model: Path, opts: ServeOptions, host: str, port: int, started: Any = None) -> None:
    """Check every option, load, bind, serve until interrupted (uvicorn handles SIGINT/SIGTERM),
    then free the model. Nothing is announced (`started`) before the address is bound."""
    import uvicorn

    from .retrain import LabelSink, command_template

    if not is_loopback(host) and not opts.token:
        raise UserError(f"--host {host} is not a loopback address: give --token (or EDGE_ANNOTATOR_TOKEN) so that "
                        "only callers holding it are answered")
    if opts.retrain_after is not None and (opts.labels_out is None or opts.spec is None):
        raise UserError("--retrain-after needs --labels-out (where the webhook's labels go) and --spec "
                        "(the spec YAML the retrain command trains on)")
    if opts.retrain_after is not None:
        command_template(opts.retrain_command)
    gate = Gate(host, opts.token, frozenset(o.rstrip("/").lower() for o in opts.allow_origins),
                frozenset(h.lower().rstrip(".") for h in opts.allow_hosts))
    scorer = Scorer(model, opts)
    app = None
    try:
        labels = LabelSink(opts.labels_out, scorer.spec) if opts.labels_out is not None else None
        app = make_app(scorer, gate, labels)
        sock = _bind(host, port)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
        server = uvicorn.Server(config)
        if started is not None:
            started(scorer, sock.getsockname()[1])
        server.run(sockets=[sock])
    finally:
        (app.state.server.scorer if app is not None else scorer).close()


def _serve_command() -> Any:
    import click

    from .options import Command, base_model_option, gpu_layers_option

    @click.command("serve", cls=Command)
    @click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                  help="Task spec YAML for a model without one embedded (zero-shot use of a base model).")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on; one other than loopback needs --token.")
    @click.option("--port", type=click.IntRange(0, 65535), default=9090, show_default=True)
    @click.option("--token", envvar="EDGE_ANNOTATOR_TOKEN", show_envvar=True, default=None,
                  help="Answer only requests carrying it (Bearer, or basic auth password).")
    @click.option("--allow-origin", "allow_origins", multiple=True, metavar="URL",
                  help="A web origin (scheme://host:port) whose pages may call the server from a browser "
                       "(repeat); pages of any other site are refused.")
    @click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
                  help="A host name the server is reached by besides loopback and --host (repeat), e.g. "
                       "host.docker.internal for Label Studio in a container.")
    @click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
                  help="Threads scoring items, each with its own llama.cpp context; predictions do not depend on it.")
    @click.option("--threads", type=click.IntRange(min=1), default=None, envvar="ANNOTATE_THREADS", show_envvar=True,
                  help="CPU threads in all, shared among the workers [default: all cores].")
    @click.option("--ctx", "n_ctx", type=click.IntRange(min=64), default=2048, show_default=True,
                  help="Context window in tokens; a longer task gets an error in its place.")
    @gpu_layers_option
    @base_model_option
    @click.option("--max-chars", type=click.IntRange(min=1), default=None,
                  help="Refuse task fields longer than this many characters.")
    @click.option("--queue", type=click.IntRange(min=1), default=1024, show_default=True,
                  help="Items that may wait; a request past it gets 503 and Retry-After, one of more tasks 413.")
    @click.option("--max-body", type=click.IntRange(min=1024), default=32 << 20, show_default=True,
                  help="Largest request body in bytes (413 above).")
    @click.option("--labels-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Append the annotations Label Studio's webhook sends as human-label JSONL here (a new "
                       "file, or one it wrote before; its folder is made).")
    @click.option("--retrain-after", type=click.IntRange(min=1), default=None,
                  help="After every N new labels from the webhook, run --retrain-command in the background and "
                       "serve its output once it exits 0 (needs --labels-out and --spec).")
    @click.option("--retrain-with", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                  help="Earlier human labels (CSV, JSONL or Parquet, as fit reads them) the retrain trains on "
                       "with the new ones.")
    @click.option("--retrain-command", default=DEFAULT_RETRAIN, show_default=True,
                  help="The retrain; {spec}, {labels} and {output} are filled in (fit publishes only after parity).")
    @click.option("--retrain-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Where each round's labels, log and model go [default: beside --labels-out].")
    def serve(model: Path, spec_path: Path | None, host: str, port: int, token: str | None,
              allow_origins: tuple[str, ...], allow_hosts: tuple[str, ...], workers: int,
              threads: int | None, n_ctx: int, gpu_layers: int, base_model: Path | None, max_chars: int | None,
              queue: int, max_body: int,
              labels_out: Path | None, retrain_after: int | None, retrain_with: Path | None, retrain_command: str,
              retrain_dir: Path | None) -> None:
        """Serve MODEL as a Label Studio ML backend (/health, /setup, /predict, /webhook).

        Each task's prediction is the one annotate + convert --to label-studio make for the same
        item. Connect it in Label Studio under project Settings > Model; with --labels-out, the
        annotations experts make there come back as training data through its webhook.

        \b
        Examples:
          annotate-cli serve emobank.gguf --port 9090
          annotate-cli serve models/gemma-3-270m-q4_k_m.gguf --spec tasks/emobank.yaml --workers 2
          annotate-cli serve emobank.gguf --labels-out labels-back.jsonl
          annotate-cli serve emobank.gguf --spec tasks/emobank.yaml --labels-out new.jsonl \\
              --retrain-after 100 --retrain-with ratings.jsonl
          EDGE_ANNOTATOR_TOKEN=s3cret annotate-cli serve emobank.gguf --host 0.0.0.0
          curl -s localhost:9090/predict -H 'Content-Type: application/json' \\
              -d '{"tasks": [{"data": {"id": "s1", "text": "What a day!"}}]}'
        """
        opts = ServeOptions(spec=spec_path, base=base_model, threads=threads, workers=workers, n_ctx=n_ctx,
                            gpu_layers=gpu_layers, max_chars=max_chars, queue=queue, max_body=max_body, token=token,
                            allow_origins=allow_origins, allow_hosts=allow_hosts, labels_out=labels_out,
                            retrain_after=retrain_after, retrain_with=retrain_with, retrain_command=retrain_command,
                            retrain_dir=retrain_dir)

        def started(s: Scorer, bound: int) -> None:
            click.echo(f"serving {model.name} (spec {s.spec.name}, model_version {s.model_version}) on "
                       f"http://{host}:{bound} with {workers} workers", err=True)

        run(model, opts, host, port, started)  # errors: runtime/cli.py's one boundary

    return serve


serve = _serve_command()
