"""Command line: each command parses its options and calls one function.

Anything that goes wrong reaches the user as one line on stderr and exit status 1;
set RUNNER_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from runner import __version__
from runner.errors import RunnerError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from runner.api import ApiConfig
    from runner.config import DaemonConfig

DEFAULT_DB = "sqlite:///runner.db"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, RunnerError | click.ClickException):
        return text
    return f"{type(exc).__name__}: {text}"


class RunnerGroup(click.Group):
    """Turns every exception into the one-line error promised above."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if os.environ.get("RUNNER_DEBUG"):
                raise
            click.echo(f"runner: error: {_one_line(exc)}", err=True)
            ctx.exit(1)


def _engine(ctx: click.Context) -> Engine:
    from runner.db import connect

    engine = connect(ctx.obj["db"])
    ctx.call_on_close(engine.dispose)  # connections closed when the command ends
    return engine


@click.group(cls=RunnerGroup)
@click.option(
    "--db",
    envvar="RUNNER_DB",
    default=DEFAULT_DB,
    show_default=True,
    help="SQLAlchemy URL of the jobs database (env RUNNER_DB).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.version_option(__version__, prog_name="runner")
@click.pass_context
def main(ctx: click.Context, db: str, verbose: bool) -> None:
    """Turn a catalogue of videos into Wav2Vec2 audio embeddings, resumably."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "apscheduler", "httpx", "urllib3", "filelock", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"db": db}


@main.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--key-field",
    default="id",
    show_default=True,
    help="Key field when FILE is a JSON array of records.",
)
@click.option("--url-field", default="url", show_default=True, help="Field holding the URL.")
@click.pass_context
def import_command(ctx: click.Context, file: Path, key_field: str, url_field: str) -> None:
    """Load FILE ({key: {url, ...}} or [{id, url, ...}]) into the jobs table; idempotent."""
    from runner.catalogue import CatalogueFormat, import_catalogue

    if not file.is_file():
        raise RunnerError(f"{file}: no such file")
    counts, rejected = import_catalogue(_engine(ctx), file, CatalogueFormat(key_field, url_field))
    click.echo(
        f"inserted {counts.inserted}, updated {counts.updated}, "
        f"unchanged {counts.unchanged}, invalid {counts.invalid}"
    )
    if rejected.count:
        click.echo(
            f"runner: {rejected.count} record(s) without a usable key were skipped "
            f"(first: {rejected.first_reason})",
            err=True,
        )


def _size(text: str) -> int:
    """Bytes from '4GiB', '500MB', '1048576'."""
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in units:
        raise click.BadParameter(f"{text!r} is not a size like 4GiB, 500MB or 1048576")
    return int(float(match.group(1)) * units[match.group(2).lower()])


class Size(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        return value if isinstance(value, int) else _size(value)


def _daemon_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `daemon` (and later `serve`): model, device and limits."""
    options = [
        click.option(
            "--model",
            "model_id",
            default=None,
            help="Hugging Face model id or local path [default: "
            "jonatasgrosman/wav2vec2-large-xlsr-53-russian].",
        ),
        click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
        ),
        click.option(
            "--dtype",
            default="auto",
            show_default=True,
            help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.",
        ),
        click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model."),
        click.option(
            "--layer",
            type=int,
            default=-1,
            show_default=True,
            help="Hidden state to pool: -1 the last, 0 the feature projection, N the "
            "output of transformer layer N.",
        ),
        click.option(
            "--pooling",
            type=click.Choice(["mean", "mean-std"]),
            default="mean",
            show_default=True,
            help="Over the L2-normalised frames: their mean, or mean and standard "
            "deviation concatenated (twice the width).",
        ),
        click.option(
            "--batch-seconds",
            type=click.FloatRange(1, 100_000),
            default=None,
            help="Audio-seconds per model batch [default: 30 on CPU, 480 on CUDA].",
        ),
        click.option(
            "--max-bytes",
            type=Size(),
            default="4GiB",
            show_default=True,
            help="Largest download accepted.",
        ),
        click.option(
            "--connect-timeout-s", type=click.FloatRange(0.1), default=30.0, show_default=True
        ),
        click.option(
            "--read-timeout-s",
            type=click.FloatRange(0.1),
            default=60.0,
            show_default=True,
            help="Longest silence while reading a response.",
        ),
        click.option(
            "--max-audio-s",
            type=click.FloatRange(0),
            default=21600.0,
            show_default=True,
            help="Sources with longer audio fail as too_long before any is embedded (0: no cap).",
        ),
        click.option(
            "--min-bytes-per-s",
            type=Size(),
            default="10KiB",
            show_default=True,
            help="A download slower than this over --stall-window-s is cut and retried "
            "(0: no floor).",
        ),
        click.option(
            "--stall-window-s",
            type=click.FloatRange(0),
            default=60.0,
            show_default=True,
            help="Window over which --min-bytes-per-s is measured.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _api_options(default_http: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options of the HTTP API (runner/api.py), shared by `daemon` and `serve`."""
    options = [
        click.option(
            "--http",
            default=default_http,
            show_default=default_http is not None,
            metavar="[HOST:]PORT",
            help="Serve the HTTP API here (host 127.0.0.1 unless given).",
        ),
        click.option(
            "--token",
            envvar="RUNNER_API_TOKEN",
            default=None,
            help="Bearer token the API requires (env RUNNER_API_TOKEN); needed to listen "
            "on anything but loopback.",
        ),
        click.option(
            "--allow-private-urls",
            is_flag=True,
            help="Let URLs from API callers (/encode_audio, and jobs queued with POST "
            "/jobs when this daemon fetches them) reach loopback, private and link-local "
            "addresses.",
        ),
        click.option(
            "--encode-timeout-s",
            type=click.FloatRange(0.1),
            default=600.0,
            show_default=True,
            help="Longest /encode_audio request.",
        ),
        click.option(
            "--max-body-bytes",
            type=Size(),
            default="8MiB",
            show_default=True,
            help="Largest API request body.",
        ),
        click.option(
            "--max-encode-requests",
            type=click.IntRange(1, 1024),
            default=4,
            show_default=True,
            help="/encode_audio requests at once; more get 429 with Retry-After.",
        ),
        click.option(
            "--encode-max-audio-s",
            type=click.FloatRange(1),
            default=1800.0,
            show_default=True,
            help="Longest audio /encode_audio embeds; longer fails with 422 too_long.",
        ),
        click.option(
            "--encode-max-body-bytes",
            type=Size(),
            default="64KiB",
            show_default=True,
            help="Largest /encode_audio request body.",
        ),
    ]

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@main.command()
@_daemon_options
@_api_options(default_http=None)
@click.option("--until-done", is_flag=True, help="Exit 0 once nothing is pending.")
@click.option(
    "--guard-catalogue-urls",
    "guard_catalogue",
    is_flag=True,
    help="Fetch the catalogue's URLs through the same guard as API callers' (no "
    "loopback, private or link-local address on any hop).",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("runner-work"),
    show_default=True,
    help="Directory for temp downloads.",
)
@click.option(
    "--downloads",
    type=click.IntRange(1, 1024),
    default=8,
    show_default=True,
    help="Transfers at once.",
)
@click.option(
    "--per-host",
    type=click.IntRange(1, 1024),
    default=4,
    show_default=True,
    help="Transfers at once to one host.",
)
@click.option(
    "--decoders",
    type=click.IntRange(1, 256),
    default=None,
    help="Decode threads [default: cores - 1, at least 1].",
)
@click.option(
    "--prefetch-files",
    type=click.IntRange(1, 4096),
    default=4,
    show_default=True,
    help="Downloaded files that may wait for a decoder.",
)
@click.option(
    "--prefetch-bytes",
    type=Size(),
    default="2GiB",
    show_default=True,
    help="Bytes of downloaded files that may wait for a decoder.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="Tries per video before it is failed.",
)
@click.option(
    "--retry-base-s",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="First retry delay; doubles per attempt, with jitter.",
)
@click.option("--retry-max-s", type=click.FloatRange(0), default=3600.0, show_default=True)
@click.option(
    "--lease-s",
    type=click.FloatRange(1),
    default=120.0,
    show_default=True,
    help="A claim not renewed for this long is given to another daemon.",
)
@click.option(
    "--grace-s",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="On SIGINT/SIGTERM, time for in-flight jobs to finish.",
)
@click.option(
    "--progress/--no-progress",
    "progress_bar",
    default=None,
    help="Live progress bar [default: on when stderr is a terminal].",
)
@click.option(
    "--log-every-s",
    type=click.FloatRange(0.1),
    default=60.0,
    show_default=True,
    help="Without a progress bar, log a progress line this often.",
)
@click.pass_context
def daemon(ctx: click.Context, **options: Any) -> None:
    """Claim pending jobs and embed them until stopped (or until done)."""
    if options["progress_bar"] is None:
        options["progress_bar"] = sys.stderr.isatty()
    _run_daemon(ctx, options)


#: `daemon` options that `serve` takes too; the rest keep their defaults there
SERVE_SHARES = ("workdir", "downloads", "per_host", "decoders", "grace_s", "log_every_s")


@main.command()
@_daemon_options
@_api_options(default_http="127.0.0.1:8080")
@click.pass_context
def serve(ctx: click.Context, **options: Any) -> None:
    """Serve the HTTP API only: the daemon's model and stages, no jobs claimed from the
    database (POST /jobs still queues them for daemons)."""
    for param in daemon.params:
        if param.name and param.name not in options:
            options[param.name] = param.type_cast_value(ctx, param.get_default(ctx))
    options.update(claim_jobs=False, until_done=False, progress_bar=False)
    _run_daemon(ctx, options)


def _run_daemon(ctx: click.Context, options: dict[str, Any]) -> None:
    """Composes the daemon and, with --http, the HTTP API around it."""
    from runner.daemon import run_daemon

    allow_private_urls = options["allow_private_urls"]
    if allow_private_urls and options.get("guard_catalogue"):
        raise RunnerError("--guard-catalogue-urls and --allow-private-urls contradict each other")
    api = _api_config(options)  # a bad --http fails before a model or the database is touched
    config = _daemon_config(options, allow_private_urls=allow_private_urls)
    services = []
    if api is not None:
        from runner.api import api_service

        services.append(api_service(api))
    run_daemon(_engine(ctx), config, services)


serve.params.extend(param for param in daemon.params if param.name in SERVE_SHARES)


def _api_config(options: dict[str, Any]) -> ApiConfig | None:
    """Pops the API options; checks the bind address now, before a model is loaded."""
    from runner.api import ApiConfig, check_bind, parse_bind

    http = options.pop("http")
    api_options = {
        name: options.pop(name)
        for name in (
            "token",
            "allow_private_urls",
            "encode_timeout_s",
            "max_body_bytes",
            "max_encode_requests",
            "encode_max_body_bytes",
            "encode_max_audio_s",
        )
    }
    if http is None:
        return None
    host, port = parse_bind(http)
    config = ApiConfig(host=host, port=port, **api_options)
    check_bind(config)
    return config


def _daemon_config(options: dict[str, Any], *, allow_private_urls: bool) -> DaemonConfig:
    from runner.config import DaemonConfig
    from runner.download import DownloadLimits, UrlGuard
    from runner.embed import DEFAULT_MODEL_ID, resolve_device, resolve_dtype
    from runner.retry import RetryPolicy

    try:
        resolve_dtype(options["dtype"], resolve_device(options["device"]))
    except ValueError as exc:
        raise RunnerError(str(exc)) from None
    limits = DownloadLimits(
        max_bytes=options.pop("max_bytes"),
        connect_timeout_s=options.pop("connect_timeout_s"),
        read_timeout_s=options.pop("read_timeout_s"),
        min_bytes_per_s=options.pop("min_bytes_per_s"),
        stall_window_s=options.pop("stall_window_s"),
    )
    retry = RetryPolicy(
        max_attempts=options.pop("max_attempts"),
        base_delay_s=options.pop("retry_base_s"),
        max_delay_s=options.pop("retry_max_s"),
    )
    if options.get("decoders") is None:
        options.pop("decoders", None)
    options["model_id"] = options["model_id"] or DEFAULT_MODEL_ID
    options["max_audio_s"] = options["max_audio_s"] or None
    options["url_guard"] = None if allow_private_urls else UrlGuard()
    return DaemonConfig(limits=limits, retry=retry, **options)


@main.command()
@click.argument("keys", nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed job.")
@click.option(
    "--error-class",
    default=None,
    help="Failed jobs of this class (download, decode, embed, invalid, lost, ...).",
)
@click.pass_context
def retry(
    ctx: click.Context, keys: tuple[str, ...], all_failed: bool, error_class: str | None
) -> None:
    """Put failed jobs back to pending, with a fresh set of attempts."""
    from runner.jobs import requeue_failed

    if not (keys or all_failed or error_class):
        raise RunnerError("nothing selected: give KEYs, --failed or --error-class")
    count = requeue_failed(_engine(ctx), keys=keys, error_class=error_class, all_failed=all_failed)
    click.echo(f"requeued {count}")


@main.command()
@click.option(
    "--other-specs",
    is_flag=True,
    required=True,
    help="Done jobs whose vectors were made with another embedding spec than --keep.",
)
@click.option(
    "--keep",
    "keep",
    required=True,
    metavar="SPEC_ID",
    help="The spec to keep (the daemon names it when it refuses to start; `runner "
    "status` lists the recorded ones).",
)
@click.pass_context
def requeue(ctx: click.Context, other_specs: bool, keep: str) -> None:
    """Put done jobs of other embedding specs back to pending, to embed them again.

    Stop the daemons of the other specs first.  Adopted vectors stay; vectors made
    before specs were recorded stay if they are of --keep's model, last layer, mean
    pooling.
    """
    from runner.spec import requeue_other_specs

    requeued, forgotten = requeue_other_specs(_engine(ctx), keep)
    click.echo(f"requeued {requeued} done job(s) of other specs; forgot {forgotten} spec(s)")


class Timestamp(click.ParamType):
    """ISO 8601 date or date-time (UTC unless it has an offset), or unix seconds.
    A bad value is a one-line `runner: error:`, like every other input error."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        from runner.export import parse_timestamp

        if isinstance(value, float):
            return value
        try:
            return parse_timestamp(str(value))
        except RunnerError as exc:
            name = param.opts[0] if param is not None else "time"
            raise RunnerError(f"{name}: {exc}") from None


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory for the files.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "npz", "parquet"]),
    default="json",
    show_default=True,
    help="json: audio_vectors.json, audio_process.json, audio_fail.json (the old "
    "script's files; vectors with NaN/Inf are skipped with a warning).  npz: "
    "vectors.npz (keys, keys_utf8 + key_offsets, vectors float32 N x D), "
    "process.json, fail.json.  parquet: vectors.parquet (key, url, vector "
    "fixed_size_list<float32>[D], facts, model, finished_at) and failed.parquet.",
)
@click.option(
    "--pca",
    type=int,
    default=None,
    metavar="N",
    help="Also write pca.npz: IncrementalPCA with N components fitted on every "
    "done vector (keys, vectors N-reduced, components, mean, "
    "explained_variance_ratio).  The other files keep the full vectors.",
)
@click.option(
    "--only-done-since",
    "since",
    type=Timestamp(),
    default=None,
    help="Only jobs that finished (done or failed) at or after this time: ISO "
    "8601 date or date-time (UTC unless an offset is given) or unix seconds.  "
    "With --pca the fit still uses every done vector.",
)
@click.option(
    "--merge",
    is_flag=True,
    help="Keep the entries of existing files that this export does not rewrite: keys "
    "the DB lacks and, with --only-done-since, keys that finished before it "
    "(--format json).",
)
@click.option(
    "--spec",
    "spec",
    default=None,
    metavar="SPEC_ID",
    help="Only the vectors of this embedding spec (`runner status` lists them).",
)
@click.option(
    "--mixed-specs",
    is_flag=True,
    help="Export vectors made with different embedding specs together (refused "
    "otherwise); each vector's spec is written beside it.",
)
@click.pass_context
def export(
    ctx: click.Context,
    out: Path,
    fmt: str,
    pca: int | None,
    since: float | None,
    merge: bool,
    spec: str | None,
    mixed_specs: bool,
) -> None:
    """Write the done vectors and the failures to files in OUT.

    Every file is streamed from the database and renamed into place when complete.
    The embedding specs of the vectors are written with them (audio_specs.json for
    --format json) and printed; vectors of different specs are exported together
    only with --mixed-specs.
    """
    from runner.export import export as run_export

    counts = run_export(
        _engine(ctx),
        out,
        merge=merge,
        fmt=fmt,
        pca=pca,
        since=since,
        spec=spec,
        mixed_specs=mixed_specs,
    )
    click.echo(
        f"exported {counts.done} vectors, {counts.failed} failures"
        + (f", kept {counts.merged} entries from earlier files" if merge else "")
        + (f", PCA to {counts.pca} dimensions" if counts.pca else "")
        + f" to {out}: {', '.join(counts.files)}"
    )
    if counts.skipped:
        click.echo(
            f"runner: warning: skipped {counts.skipped} vector(s) holding NaN or Inf, "
            f"which JSON cannot hold (first: {counts.skipped_key!r}); "
            "--format npz or parquet writes them as stored",
            err=True,
        )
    for group in counts.specs:
        click.echo(f"  {group.vectors} vector(s): {group.describe()}")
    if counts.merged_unrecorded:
        click.echo(
            f"runner: warning: kept {counts.merged} entries from earlier files that "
            "do not record their embedding spec (no audio_specs.json); they may be of "
            "another model",
            err=True,
        )
    if counts.mixed:
        click.echo(
            f"runner: warning: the export mixes {len(counts.specs)} embedding specs "
            "(--mixed-specs); each vector's spec is written beside it",
            err=True,
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--top",
    type=click.IntRange(0),
    default=5,
    show_default=True,
    help="How many failure reasons to show.",
)
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.option(
    "--watch-count",
    type=click.IntRange(1),
    default=None,
    hidden=True,
    help="Stop --watch after this many reports (implies --watch).",
)
@click.pass_context
def status(
    ctx: click.Context,
    as_json: bool,
    top: int,
    watch: bool,
    interval: float,
    watch_count: int | None,
) -> None:
    """Counts per state, jobs finished in the last 5 and 60 minutes, the ETA, the
    oldest running job and the most common failure reasons."""
    from runner.status import show_status

    watching = watch or watch_count is not None
    show_status(
        _engine(ctx),
        as_json=as_json,
        top=top,
        echo=click.echo,
        watch_s=interval if watching else None,
        count=watch_count,
        clear=watching and not as_json and sys.stdout.isatty(),
    )


@main.command("import-results")
@click.argument("directory", type=click.Path(path_type=Path))
@click.pass_context
def import_results(ctx: click.Context, directory: Path) -> None:
    """Adopt the old script's audio_vectors.json, audio_process.json and audio_fail.json
    from DIRECTORY (any may be missing), so those keys are not computed again.

    Good vectors become done jobs (model 'adopted', with audio_process.json's facts).
    All-zero vectors (norm < 1e-6, what the old script produced) are not adopted: the
    key stays or is queued pending with a note, or, unknown to the database and so
    without a URL, is failed 'no url' until the catalogue is imported.  Failures become
    failed jobs (error class 'adopted') that `runner retry --failed` can retry, unless
    this runner already tried the key.  A done job is never overwritten.  One
    transaction: a broken file imports nothing.
    """
    import time

    from runner.adopt import import_results as run_import

    counts = run_import(_engine(ctx), directory, now=time.time())
    click.echo(
        f"adopted {counts.adopted}, queued {counts.queued} for recomputation, "
        f"failed {counts.failed} ({counts.no_url} without a url), "
        f"skipped {counts.skipped} (done, running or already tried); "
        f"process facts for {counts.facts}"
    )


@main.command()
@click.option(
    "--done-before",
    "before",
    type=Timestamp(),
    required=True,
    help="Prune done jobs that finished before this time: ISO 8601 date or "
    "date-time (UTC unless an offset is given) or unix seconds.",
)
@click.option(
    "--keep-results",
    is_flag=True,
    help="Keep the rows and their results (vector, process facts), so the keys "
    "are still exported and never recomputed; drop only the catalogue "
    "record stored with each (meta).",
)
@click.pass_context
def prune(ctx: click.Context, before: float, keep_results: bool) -> None:
    """Drop done jobs finished before --done-before, then VACUUM.

    Without --keep-results the rows are deleted, vectors and all: export first, and
    mind that importing a catalogue that still lists those keys queues them again.
    Failed jobs are never pruned (they are for `runner retry`).  SQLite gives the
    space back to the file system; PostgreSQL keeps it for new rows (VACUUM FULL
    jobs would return it, but locks the table while it runs).
    """
    from runner.adopt import format_bytes
    from runner.adopt import prune as run_prune

    engine = _engine(ctx)
    report = run_prune(engine, before=before, keep_results=keep_results)
    sqlite = engine.dialect.name == "sqlite"
    click.echo(
        f"pruned {report.rows} done job(s)"
        + (" (kept their results)" if keep_results else "")
        + f"; {'database' if sqlite else 'jobs table'} {format_bytes(report.bytes_before)} -> "
        f"{format_bytes(report.bytes_after)}"
        + (
            f", reclaimed {format_bytes(report.reclaimed)}"
            if sqlite
            else " (PostgreSQL reuses the freed space for new rows)"
        )
    )


def run() -> None:
    """The `runner` command: `main`, then a quick exit.  The interpreter's last
    garbage collection walks every object SQLAlchemy and the driver made at import,
    60 ms of a 450 ms `runner status`, and frees nothing the exit would not: the
    command is over and its connections closed.  (Not in `main`, which tests call
    in-process many times.)"""
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    run()
