"""runner: resumable audio-embedding daemon for video catalogues."""

from __future__ import annotations

import os

__version__ = "0.1.0"

# The model thread shares the cores with ffmpeg decoders.  OpenMP's default is to
# spin idle worker threads for a while after each parallel region, which steals
# those cores from the decoders; PASSIVE makes them sleep.  It must be set before
# torch is first imported, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
