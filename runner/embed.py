"""The encoder (any wav2vec2-family checkpoint), batched windows and frame pooling.

A video's vector is the mean of its L2-normalised frame vectors over every valid
frame of the whole track (``mean-std`` pooling appends their standard deviation).
The track is cut into windows of at most 30 s so attention cost stays bounded;
each window contributes the *sum* of its normalised frames (and, for mean-std,
of their squares) plus a frame count, so windows from many videos can share a
batch and be summed per video afterwards: the result is exactly the mean and
population standard deviation over every frame of the track.  Padding never leaks
in: layer-norm checkpoints get an attention mask and only the frames of each
window's real length are pooled; group-norm checkpoints (which cannot mask) are
batched only with windows of equal length.

Families: whatever ``AutoModel`` and ``AutoFeatureExtractor`` load of Wav2Vec2
(with or without a CTC head: the head is dropped, the encoder's weights load),
HuBERT, WavLM and Data2VecAudio; tests run a tiny random checkpoint of each.
`layer` picks the hidden state: -1 (the default) or the number of layers is the
model's output; 0 is the input of the first transformer layer (the feature
projection with its positional convolution); N the output of layer N.  For a layer
below the last the encoder is cut after layer N+1 and the forward pass stops at
that layer's input (what we keep), so the later layers cost nothing.

CPU and CUDA run the same code; the device and dtype switch it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.decode import SAMPLE_RATE_HZ
from runner.errors import RunnerError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "jonatasgrosman/wav2vec2-large-xlsr-53-russian"
WINDOW_S = 30.0
WINDOW_SAMPLES = int(WINDOW_S * SAMPLE_RATE_HZ)


#: checkpoint families promised to work (transformers' model_type); tests cover each
FAMILIES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
POOLINGS = ("mean", "mean-std")
#: families whose padded frames reach the real ones even with an attention mask:
#: their windows share a batch only with windows of the same length
PADDING_LEAKS = frozenset({"data2vec-audio"})


class BadSetting(RunnerError, ValueError):
    """A --device or --dtype that cannot be used: one line at the CLI (RunnerError),
    and still the ValueError callers of `resolve_device`/`resolve_dtype` catch."""


@dataclass(frozen=True)
class WindowEmbedding:
    """Sum of a window's L2-normalised frame vectors, and how many frames it had."""

    frame_sum: np.ndarray  # float64, (hidden_size,)
    frames: int
    #: mean-std pooling: the sum of the squares of the same frame vectors
    frame_sq_sum: np.ndarray | None = None


def pooled(frame_sum: np.ndarray, frame_sq_sum: np.ndarray | None, frames: int) -> np.ndarray:
    """The video's vector from its sums: the mean, and with squares the population
    standard deviation after it (twice the width)."""
    if frames == 0:
        raise ValueError("audio too short to embed: no frames")
    mean = frame_sum / frames
    if frame_sq_sum is None:
        return mean.astype(np.float32)
    std = np.sqrt(np.maximum(frame_sq_sum / frames - mean * mean, 0.0))
    return np.concatenate([mean, std]).astype(np.float32)


def resolve_device(name: str) -> torch.device:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise BadSetting(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadSetting(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BadSetting(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
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
        raise BadSetting(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
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
        layer: int = -1,
        pooling: str = "mean",
    ) -> None:
        _quiet_transformers()
        from transformers import AutoFeatureExtractor

        if pooling not in POOLINGS:
            raise RunnerError(f"unknown pooling {pooling!r}: use {' or '.join(POOLINGS)}")
        self.model_id = model_id
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pooling = pooling
        _check_files(model_id)
        try:
            _check_layer_early(model_id, layer)
            self.features = AutoFeatureExtractor.from_pretrained(model_id)
            model = _load_encoder(model_id, self.dtype)
        except (OSError, ValueError) as exc:  # not RunnerError: the layer's is said as is
            raise RunnerError(f"cannot load model {model_id!r}: {_one_line(exc)}") from None
        config = model.config
        layers = _encoder_layers(model, model_id)
        self.layers = len(layers)
        self.layer = _resolve_layer(layer, self.layers, model_id)
        #: a hidden state below the last: read at the input of layer `layer`, where
        #: the forward pass stops (a compiled model runs that layer to the end)
        self._captured: list[torch.Tensor] = []
        self._stop_early = not compile_model
        if self.layer < self.layers:
            model.encoder.layers = torch.nn.ModuleList(list(layers)[: self.layer + 1])
            model.encoder.layers[self.layer].register_forward_pre_hook(
                self._capture, with_kwargs=True
            )
        model.eval().to(self.device)
        self.model: Any = torch.compile(model) if compile_model else model
        self._config = config
        self.hidden_size = int(config.hidden_size)
        #: width of the video vectors
        self.dim = self.hidden_size * (2 if pooling == "mean-std" else 1)
        # Data2VecAudio has no feat_extract_norm: its feature encoder is layer-normed,
        # but the layer norms inside its positional convolution carry padding into
        # the real frames beside it, so it is batched like a group-norm model
        self.masks_padding = (
            getattr(config, "feat_extract_norm", "layer") == "layer"
            and config.model_type not in PADDING_LEAKS
        )
        #: torch warns on every masked WavLM batch (its position bias is a float
        #: mask beside the boolean padding mask); harmless, and an error under -W error
        self._mask_warning = config.model_type == "wavlm" and self.masks_padding
        self._output_lengths: Any = model._get_feat_extract_output_lengths
        self._pin = self.device.type == "cuda"
        from runner.spec import EmbedSpec, fingerprint, model_name

        self.spec = EmbedSpec(
            model=model_name(model_id),
            fingerprint=fingerprint(model_id, config.to_json_string()),
            layer=self.layer,
            layers=self.layers,
            pooling=pooling,
            dtype=str(self.dtype).removeprefix("torch."),
            dim=self.dim,
            family=str(config.model_type),
        )

    def _capture(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._captured.append(args[0] if args else kwargs["hidden_states"])
        if self._stop_early:
            raise _Captured

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

    def _hidden(self, values: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The chosen hidden state, (batch, frames, hidden)."""
        if self._mask_warning:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Support for mismatched key_padding")
                return self._forward(values, kwargs)
        return self._forward(values, kwargs)

    def _forward(self, values: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.layer == self.layers:
            return self.model(values, **kwargs).last_hidden_state
        self._captured.clear()
        with contextlib.suppress(_Captured):
            self.model(values, **kwargs)
        try:
            return self._captured[-1]
        finally:
            self._captured.clear()

    @torch.inference_mode()
    def embed(self, windows: Sequence[np.ndarray]) -> list[WindowEmbedding]:
        """One forward pass over windows that share a `batch_key`."""
        values, mask = self._inputs(windows)
        values = values.to(self.device, non_blocking=True).to(self.dtype)
        mask = mask.to(self.device, non_blocking=True)
        kwargs = {"attention_mask": mask} if self.masks_padding else {}
        hidden = self._hidden(values, kwargs).float()
        lengths = torch.tensor([len(w) for w in windows])
        frames = self._output_lengths(lengths).to(self.device)
        valid = torch.arange(hidden.shape[1], device=self.device)[None, :] < frames[:, None]
        unit = torch.nn.functional.normalize(hidden, dim=-1) * valid[..., None]
        sums = unit.sum(dim=1).double().cpu().numpy()
        squares = None
        if self.pooling == "mean-std":
            squares = (unit * unit).sum(dim=1).double().cpu().numpy()
        counts = frames.cpu().tolist()
        return [
            WindowEmbedding(
                frame_sum=sums[i],
                frames=int(counts[i]),
                frame_sq_sum=None if squares is None else squares[i],
            )
            for i in range(len(windows))
        ]


class _Captured(Exception):
    """Raised by the hook that read the chosen hidden state: nothing after it is needed."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def looks_like_path(model_id: str) -> bool:
    """A directory, not a hub id (`org/name`, or a bare `name`)."""
    return (
        model_id.startswith(("/", "./", "../", "~", "."))
        or model_id.count("/") > 1
        or model_id.endswith("/")
        or "\\" in model_id
    )


def _check_files(model_id: str) -> None:
    """One clear line, before transformers' longer ones: a path that is not there,
    or a checkpoint directory without the feature extractor's settings."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RunnerError(f"cannot load model: {path} has no config.json")
        if not (path / "preprocessor_config.json").is_file():
            raise RunnerError(
                f"cannot load model: {path} has no preprocessor_config.json (the feature "
                "extractor's settings: save a Wav2Vec2FeatureExtractor there, or copy the "
                "file from the checkpoint's hub repo)"
            )
    elif looks_like_path(model_id):
        raise RunnerError(f"cannot load model: no such model directory: {model_id}")


def _check_layer_early(model_id: str, layer: int) -> None:
    """A bad --layer, said before the weights load (the config is a few KB).  Left
    to `_resolve_layer` when the config has no num_hidden_layers."""
    from transformers import AutoConfig

    layers = getattr(AutoConfig.from_pretrained(model_id), "num_hidden_layers", None)
    if isinstance(layers, int) and layers > 0:
        _resolve_layer(layer, layers, model_id)


def _load_encoder(model_id: str, dtype: torch.dtype) -> Any:
    """AutoModel: the base encoder of any head (a CTC checkpoint's encoder weights
    load under its prefix); SDPA attention where the family has it (WavLM has not)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(model_id, attn_implementation="sdpa", dtype=dtype)
    except ValueError as exc:
        if "scaled_dot_product_attention" not in str(exc) and "sdpa" not in str(exc):
            raise RunnerError(f"cannot load model {model_id!r}: {_one_line(exc)}") from None
    try:
        return AutoModel.from_pretrained(model_id, dtype=dtype)
    except ValueError as exc:
        raise RunnerError(f"cannot load model {model_id!r}: {_one_line(exc)}") from None


def _encoder_layers(model: Any, model_id: str) -> Sequence[Any]:
    """The transformer layers: what every wav2vec2-family encoder has."""
    model_type = getattr(model.config, "model_type", "?")
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if layers is None or not hasattr(model, "_get_feat_extract_output_lengths"):
        raise RunnerError(
            f"model {model_id!r} ({model_type}) is not a wav2vec2-family audio encoder: "
            f"use one of {', '.join(FAMILIES)}"
        )
    if model_type not in FAMILIES:
        log.warning(
            "model %s is a %s checkpoint, not one of the tested families (%s)",
            model_id,
            model_type,
            ", ".join(FAMILIES),
        )
    return layers


def _resolve_layer(layer: int, layers: int, model_id: str) -> int:
    """-1 is the last hidden state; hidden states are numbered 0..layers."""
    if not -(layers + 1) <= layer <= layers:
        raise RunnerError(
            f"--layer {layer} is out of range for {model_id!r}: it has hidden states "
            f"0 to {layers} (or -{layers + 1} to -1; -1 is the last)"
        )
    return layer if layer >= 0 else layers + 1 + layer


def pool(parts: Sequence[WindowEmbedding], hidden_size: int) -> np.ndarray:
    """The video's vector from its windows' sums (mean, or mean and std)."""
    total = np.zeros(hidden_size, dtype=np.float64)
    squares = None
    frames = 0
    for part in parts:
        total += part.frame_sum
        if part.frame_sq_sum is not None:
            squares = part.frame_sq_sum.copy() if squares is None else squares + part.frame_sq_sum
        frames += part.frames
    return pooled(total, squares, frames)


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
