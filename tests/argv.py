"""Command lines for `runner` as the tests and the soak run it, so the options every
run needs (the tiny model, on CPU, a workdir of its own) are written once."""

from __future__ import annotations

import sys
from pathlib import Path


def daemon_args(model: Path, workdir: Path, *extra: str) -> list[str]:
    """`daemon` and its options, for `Cli` or after `runner_process`."""
    return ["daemon", "--model", str(model), "--device", "cpu", "--workdir", str(workdir), *extra]


def runner_process(db_url: str, *args: str) -> list[str]:
    """argv of `runner --db URL ARGS` as a process of its own."""
    return [sys.executable, "-m", "runner.cli", "--db", db_url, *args]
