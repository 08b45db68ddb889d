"""Kill -9 soak (issue 5, proof 1): SIGKILL the daemon at random moments, at least
10 times over 30 videos, then let it finish.  Every key is done exactly once, with
the vectors of an uninterrupted run; nothing is left running and no temp file is
left behind.  The scenario lives in benchmarks/soak.py, which prints the same
figures for the README."""

from __future__ import annotations

from pathlib import Path

from benchmarks.soak import run_soak


def test_sigkill_soak_loses_nothing_and_repeats_nothing(
    tmp_path: Path, tiny_model: Path, embedder: object
) -> None:
    report = run_soak(tmp_path, tiny_model, cycles=10, videos=30, seed=5, embedder=embedder)
    summary = "\n".join(report.lines())
    assert report.cycles == 10 and report.jobs == 30, summary
    assert report.final_exit == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    assert report.final_counts == {"done": 30}, summary  # none running, none failed
    assert report.duplicates == [], summary
    assert report.lost == [], summary
    assert report.vectors_match, summary
    assert report.leftover_temp_files == [], summary
    # the kills did strand work, and each restart gave it back before claiming
    # (the lease is 600 s: only the dead-pid check can have done it)
    assert report.kills_with_work >= 5, summary
    assert report.dead_pid_reaps >= 5 and report.reaps_missed == 0, summary
