"""The daemon's settings, in one frozen value the CLI builds and every stage reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from runner.decode import DEFAULT_MAX_AUDIO_S
from runner.download import DownloadLimits, UrlGuard
from runner.retry import RetryPolicy


def _default_decoders() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class DaemonConfig:
    model_id: str
    workdir: Path
    device: str = "auto"
    dtype: str = "auto"
    compile_model: bool = False
    #: the hidden state pooled (-1: the last; 0: the feature projection; see embed.py)
    layer: int = -1
    #: mean, or mean-std (mean and standard deviation: twice the width)
    pooling: str = "mean"
    until_done: bool = False
    downloads: int = 8
    per_host: int = 4
    decoders: int = field(default_factory=_default_decoders)
    #: audio-seconds per model batch; None: the device's default (see embed.py)
    batch_seconds: float | None = None
    #: longer sources fail as too_long, before a window is embedded; None: no cap
    max_audio_s: float | None = DEFAULT_MAX_AUDIO_S
    limits: DownloadLimits = field(default_factory=DownloadLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: downloaded-but-undecoded files waiting on disk: at most this many / bytes
    prefetch_files: int = 4
    prefetch_bytes: int = 2 << 30
    poll_s: float = 2.0
    lease_s: float = 120.0
    reap_every_s: float = 30.0
    #: on the first SIGINT/SIGTERM, how long in-flight jobs may take to finish
    grace_s: float = 30.0
    store_batch: int = 64
    #: without a terminal, one progress line in the log this often
    log_every_s: float = 60.0
    #: a live tqdm bar on stderr instead of log lines (the CLI turns it on for a tty)
    progress_bar: bool = False
    #: False for `runner serve`: no jobs from the database, only the HTTP API's
    claim_jobs: bool = True
    #: what jobs queued through the API (and, with `guard_catalogue`, every job) are
    #: fetched through: no loopback, private or link-local address on any hop; None
    #: lets them reach anything (--allow-private-urls)
    url_guard: UrlGuard | None = field(default_factory=UrlGuard)
    guard_catalogue: bool = False

    @property
    def claim_ahead(self) -> int:
        """Attempts held at once: enough to keep every download slot, the prefetch
        and the decoders busy.  Claimed-ahead jobs cost no try until they start."""
        return self.downloads + self.prefetch_files + self.decoders * 2
