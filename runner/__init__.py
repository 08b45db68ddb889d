"""runner: resumable audio-embedding daemon for video catalogues."""

from __future__ import annotations

__version__ = "0.1.0"
