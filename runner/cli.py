"""Command line: each command parses its options and calls one function.

Anything that goes wrong reaches the user as one line on stderr and exit status 1;
set RUNNER_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from runner import __version__
from runner.errors import RunnerError

if TYPE_CHECKING:
    from sqlalchemy import Engine

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

    return connect(ctx.obj["db"])


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
    for noisy in ("alembic", "httpx", "urllib3", "filelock", "aiohttp.access"):
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


@main.command()
@click.option(
    "--model",
    "model_id",
    default=None,
    help="Hugging Face model id or local path [default: "
    "jonatasgrosman/wav2vec2-large-xlsr-53-russian].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.",
)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--until-done", is_flag=True, help="Exit 0 once nothing is pending.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("runner-work"),
    show_default=True,
    help="Directory for temp downloads.",
)
@click.option(
    "--downloads",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Transfers at once.",
)
@click.option(
    "--decoders",
    type=click.IntRange(1, 256),
    default=None,
    help="Decode threads [default: cores - 1, at least 1].",
)
@click.option(
    "--batch-seconds",
    type=click.FloatRange(1, 100_000),
    default=120.0,
    show_default=True,
    help="Audio-seconds per model batch.",
)
@click.option(
    "--max-bytes",
    type=click.IntRange(1),
    default=4 << 30,
    show_default=True,
    help="Largest download accepted.",
)
@click.option("--connect-timeout-s", type=click.FloatRange(0.1), default=30.0, show_default=True)
@click.option("--read-timeout-s", type=click.FloatRange(0.1), default=60.0, show_default=True)
@click.pass_context
def daemon(
    ctx: click.Context,
    model_id: str | None,
    device: str,
    dtype: str,
    compile_model: bool,
    until_done: bool,
    workdir: Path,
    downloads: int,
    decoders: int | None,
    batch_seconds: float,
    max_bytes: int,
    connect_timeout_s: float,
    read_timeout_s: float,
) -> None:
    """Claim pending jobs and embed them until stopped (or until done)."""
    from runner.download import DownloadLimits
    from runner.embed import DEFAULT_MODEL_ID, resolve_device, resolve_dtype
    from runner.pipeline import DaemonConfig, run_daemon

    try:
        resolve_dtype(dtype, resolve_device(device))
    except ValueError as exc:
        raise RunnerError(str(exc)) from None
    config = DaemonConfig(
        model_id=model_id or DEFAULT_MODEL_ID,
        workdir=workdir,
        device=device,
        dtype=dtype,
        compile_model=compile_model,
        until_done=until_done,
        downloads=downloads,
        batch_seconds=batch_seconds,
        limits=DownloadLimits(
            max_bytes=max_bytes, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
        ),
        **({"decoders": decoders} if decoders else {}),
    )
    run_daemon(_engine(ctx), config)


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory for the three JSON files.",
)
@click.option("--merge", is_flag=True, help="Keep keys of existing files that the DB lacks.")
@click.pass_context
def export(ctx: click.Context, out: Path, merge: bool) -> None:
    """Write audio_vectors.json, audio_process.json and audio_fail.json."""
    from runner.export import export as run_export

    counts = run_export(_engine(ctx), out, merge=merge)
    click.echo(
        f"exported {counts.done} vectors, {counts.failed} failures"
        + (f", kept {counts.merged} entries from earlier files" if merge else "")
        + f" to {out}"
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
@click.pass_context
def status(ctx: click.Context, as_json: bool, top: int) -> None:
    """Counts per state and the most common failure reasons."""
    from runner.status import format_status, read_status

    report = read_status(_engine(ctx), top=top)
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))


if __name__ == "__main__":
    main()
