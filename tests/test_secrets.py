"""Secrets stay out of messages, reprs and logs (issue 12, "Secrets").

A --db URL often carries the database password and --token the API's bearer token;
both would otherwise end up in terminals, CI logs and pasted bug reports.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner.api import ApiConfig
from runner.db import shown_url
from tests.conftest import Cli

SECRET = "s3cret"
TOKEN = "t0ken-never-shown"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"postgresql://u:{SECRET}@127.0.0.1:1/x", "cannot open database"),
        (f"postgresql://u:{SECRET}@127.0.0.1:abc/x", "invalid --db URL"),
        (f"postgresql://u:{SECRET}@[::1/x", "invalid --db URL"),
        (f"postgresql://u:{SECRET}@127.0.0.1:1/x?sslmode={SECRET}", "cannot open database"),
        (f"nosuchdb://u:{SECRET}@127.0.0.1:1/x", "unsupported --db URL"),
        (f"u:{SECRET}@127.0.0.1", "invalid --db URL"),
    ],
)
def test_db_password_never_in_the_error(
    url: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One error line, naming the problem, without the password (port 1 on 127.0.0.1
    refuses at once: nothing leaves the machine)."""
    with caplog.at_level(logging.DEBUG):
        result = Cli(url)("status", ok=False)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("runner: error: "), lines
    assert says in lines[0]
    assert SECRET not in result.output + result.stderr
    assert SECRET not in caplog.text


def test_db_password_hidden_in_a_real_process() -> None:
    """The same through the installed entry point, as a user would see it."""
    url = f"postgresql://u:{SECRET}@127.0.0.1:1/x"
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", "--db", url, "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "cannot open database" in done.stderr
    assert SECRET not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///runner.db", "sqlite:///runner.db"),
        ("u:pw@h", "***@h"),  # unparseable: all of the user info goes
        ("x://u:p@w@h:zz/db", "x://u:***@h:zz/db"),  # an unescaped "@" in the password
    ],
)
def test_shown_url(url: str, shown: str) -> None:
    assert shown_url(url) == shown


def test_api_config_repr_hides_the_token() -> None:
    config = ApiConfig(token="t0ken")
    assert "t0ken" not in repr(config) and "t0ken" not in str(config)
    assert config.token == "t0ken"


def test_daemon_log_never_shows_the_token(tmp_path: Path, tiny_model: Path) -> None:
    """A real `runner serve --token`, logging at debug level, from start to SIGTERM:
    no log line carries the token (given on the command line and in the env)."""
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_DEBUG"}
    env |= {"RUNNER_API_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [
        sys.executable,
        "-m",
        "runner.cli",
        "--verbose",
        "--db",
        f"sqlite:///{tmp_path / 'runner.db'}",
        "serve",
        "--http",
        "127.0.0.1:0",
        "--token",
        TOKEN,
        "--model",
        str(tiny_model),
        "--device",
        "cpu",
        "--workdir",
        str(tmp_path / "w"),
    ]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"HTTP API listening on \S+", line):
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert listening.wait(120), "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0, "".join(lines)
    assert lines and TOKEN not in "".join(lines)
