"""The Wav2Vec2 model, batched windows and frame pooling.

A video's vector is the mean of its L2-normalised frame vectors over every valid
frame of the whole track.  The track is cut into windows of at most 30 s so
attention cost stays bounded; each window contributes the *sum* of its normalised
frames plus a frame count, so windows from many videos can share a batch and be
summed per video afterwards.  Padding never leaks in: layer-norm checkpoints get
an attention mask and only the frames of each window's real length are pooled;
group-norm checkpoints (which cannot mask) are batched only with windows of equal
length.

CPU and CUDA run the same code; the device and dtype switch it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from runner.decode import SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "jonatasgrosman/wav2vec2-large-xlsr-53-russian"
WINDOW_S = 30.0
WINDOW_SAMPLES = int(WINDOW_S * SAMPLE_RATE_HZ)


@dataclass(frozen=True)
class WindowEmbedding:
    """Sum of a window's L2-normalised frame vectors, and how many frames it had."""

    frame_sum: np.ndarray  # float64, (hidden_size,)
    frames: int


def resolve_device(name: str) -> torch.device:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def default_batch_seconds(device: torch.device) -> float:
    """Audio-seconds per batch when the user does not say.

    On CPU a bigger batch buys no speed (the cores are busy either way) but costs
    memory: activations grow with the batch, and with 120 s a 2-hour file cost
    about 250 MB more peak RSS than a 10-second one, against 75 MB with 30 s.  A GPU
    needs many windows in flight to fill its SMs, and has the memory for them.
    """
    return 480.0 if device.type == "cuda" else 30.0


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 halves memory traffic on GPUs; CPUs get float32 for exactness."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return dtypes[name]


def _quiet_transformers() -> None:
    """The load report lists the CTC head we deliberately drop; it is not news."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class Embedder:
    """Owns the model on its device; one instance per process, used by one thread."""

    def __init__(
        self,
        model_id: str = DEFAULT_MODEL_ID,
        *,
        device: str = "auto",
        dtype: str = "auto",
        compile_model: bool = False,
    ) -> None:
        _quiet_transformers()
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        self.model_id = model_id
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.features = Wav2Vec2FeatureExtractor.from_pretrained(model_id)
            # A CTC checkpoint loads without its head: we want the encoder's states.
            model = Wav2Vec2Model.from_pretrained(
                model_id, attn_implementation="sdpa", dtype=self.dtype
            )
        except OSError as exc:
            raise ValueError(f"cannot load model {model_id!r}: {exc}") from None
        model.eval().to(self.device)
        self.model: Any = torch.compile(model) if compile_model else model
        self._config = model.config
        self.hidden_size = int(model.config.hidden_size)
        self.masks_padding = model.config.feat_extract_norm == "layer"
        self._output_lengths: Any = model._get_feat_extract_output_lengths
        self._pin = self.device.type == "cuda"

    def batch_key(self, n_samples: int) -> int:
        """Windows may share a batch only if their batch keys are equal."""
        return 0 if self.masks_padding else n_samples

    def frames_for(self, n_samples: int) -> int:
        return int(self._output_lengths(torch.tensor(n_samples)).item())

    def _inputs(self, windows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise each window on its own real samples, then zero-pad (as the
        feature extractor does), into one host buffer that can be pinned."""
        longest = max(len(w) for w in windows)
        values = torch.zeros((len(windows), longest), dtype=torch.float32, pin_memory=self._pin)
        mask = torch.zeros((len(windows), longest), dtype=torch.long, pin_memory=self._pin)
        normalise = bool(getattr(self.features, "do_normalize", True))
        for row, window in enumerate(windows):
            x = torch.from_numpy(np.asarray(window, dtype=np.float32))
            if normalise:
                x = (x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7)
            values[row, : len(window)] = x
            mask[row, : len(window)] = 1
        return values, mask

    @torch.inference_mode()
    def embed(self, windows: Sequence[np.ndarray]) -> list[WindowEmbedding]:
        """One forward pass over windows that share a `batch_key`."""
        values, mask = self._inputs(windows)
        values = values.to(self.device, non_blocking=True).to(self.dtype)
        mask = mask.to(self.device, non_blocking=True)
        kwargs = {"attention_mask": mask} if self.masks_padding else {}
        hidden = self.model(values, **kwargs).last_hidden_state.float()
        lengths = torch.tensor([len(w) for w in windows])
        frames = self._output_lengths(lengths).to(self.device)
        valid = torch.arange(hidden.shape[1], device=self.device)[None, :] < frames[:, None]
        unit = torch.nn.functional.normalize(hidden, dim=-1) * valid[..., None]
        sums = unit.sum(dim=1).double().cpu().numpy()
        counts = frames.cpu().tolist()
        return [
            WindowEmbedding(frame_sum=sums[i], frames=int(counts[i])) for i in range(len(windows))
        ]


def pool(parts: Sequence[WindowEmbedding], hidden_size: int) -> np.ndarray:
    """Mean of normalised frames over the whole video, from per-window sums."""
    total = np.zeros(hidden_size, dtype=np.float64)
    frames = 0
    for part in parts:
        total += part.frame_sum
        frames += part.frames
    if frames == 0:
        raise ValueError("audio too short to embed: no frames")
    return (total / frames).astype(np.float32)


def embed_audio(embedder: Embedder, windows: Sequence[np.ndarray]) -> np.ndarray:
    """One video, one window per forward pass: the reference the batched path must match."""
    usable = [w for w in windows if embedder.frames_for(len(w)) > 0]
    parts = [part for w in usable for part in embedder.embed([w])]
    return pool(parts, embedder.hidden_size)


@dataclass(frozen=True)
class WindowItem:
    """One window and what it belongs to: the daemon's `Attempt`, by reference, so a
    window can only ever be summed into the attempt that decoded it."""

    owner: Any
    samples: np.ndarray


class WindowBatcher:
    """Picks batches from windows of many videos.

    The oldest waiting window always goes into the next batch (nothing starves);
    the rest of the batch is filled with the windows closest to it in length, up
    to a budget of padded audio-seconds, so little compute is spent on padding.
    """

    def __init__(self, embedder: Embedder, batch_seconds: float) -> None:
        self._key = embedder.batch_key
        self.budget_samples = max(1, int(batch_seconds * SAMPLE_RATE_HZ))
        self.pending: list[WindowItem] = []
        self._buffered_samples = 0

    @property
    def full(self) -> bool:
        """Enough buffered to choose well; more would only hold memory."""
        return self._buffered_samples >= 2 * self.budget_samples

    def shrink(self) -> bool:
        """Halve the batch budget (the device ran out of memory); False once a batch
        is already down to one window's worth."""
        if self.budget_samples <= WINDOW_SAMPLES:
            return False
        self.budget_samples = max(WINDOW_SAMPLES, self.budget_samples // 2)
        return True

    def add(self, item: WindowItem) -> None:
        self.pending.append(item)
        self._buffered_samples += len(item.samples)

    def next_batch(self) -> list[WindowItem]:
        if not self.pending:
            return []
        anchor = self.pending[0]
        key, size = self._key(len(anchor.samples)), len(anchor.samples)
        ranked = sorted(
            (
                i
                for i in range(1, len(self.pending))
                if self._key(len(self.pending[i].samples)) == key
            ),
            key=lambda i: abs(len(self.pending[i].samples) - size),
        )
        chosen, longest = [0], size
        for i in ranked:
            candidate = max(longest, len(self.pending[i].samples))
            if candidate * (len(chosen) + 1) > self.budget_samples:
                break
            chosen.append(i)
            longest = candidate
        picked = set(chosen)
        batch = [self.pending[i] for i in sorted(picked)]
        self.pending = [item for i, item in enumerate(self.pending) if i not in picked]
        self._buffered_samples -= sum(len(item.samples) for item in batch)
        return batch
