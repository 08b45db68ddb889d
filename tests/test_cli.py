"""Bad input gets one line on stderr and exit 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cli, write_catalogue


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runner: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("db", "fragment"),
    [
        ("nonsense://x", "unsupported --db URL"),
        ("not a url at all", "invalid --db URL"),
        ("sqlite:////no/such/dir/runner.db", "database directory does not exist"),
    ],
)
def test_bad_db_url(db: str, fragment: str, tmp_path: Path) -> None:
    result = Cli(db)("status", ok=False)
    assert fragment in one_line_error(result)


def test_bad_device(cli: Cli, tiny_model: Path) -> None:
    result = cli("daemon", "--model", str(tiny_model), "--device", "tpu", ok=False)
    assert "unsupported device 'tpu'" in one_line_error(result)


def test_missing_model_path(cli: Cli, tmp_path: Path) -> None:
    cli("import", str(write_catalogue(tmp_path / "c.json", {"a": {"url": "http://x/a"}})))
    result = cli(
        "daemon",
        "--model",
        str(tmp_path / "no-model"),
        "--device",
        "cpu",
        "--until-done",
        "--workdir",
        str(tmp_path / "w"),
        ok=False,
    )
    assert "cannot load model" in one_line_error(result)
    assert Cli(cli.db_url)("status", "--json").stdout.count('"running": 0') == 1


def test_export_into_a_file_path(cli: Cli, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cli("export", "--out", str(blocker / "sub"), ok=False)
    assert "cannot create output directory" in one_line_error(result)


def test_status_on_empty_db(cli: Cli) -> None:
    result = cli("status")
    assert result.stdout.startswith("total 0: pending 0, running 0, done 0, failed 0")


def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.cli",
            "--db",
            f"sqlite:///{tmp_path / 'x.db'}",
            "import",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"runner: error: {tmp_path / 'nope'}: no such file"
    assert "Traceback" not in proc.stderr
