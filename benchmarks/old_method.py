"""The script the runner replaced, kept faithfully as the benchmark's baseline.

It is only fair to compare against what users actually ran, slow steps and broken
pooling included: one video at a time, the whole body in memory, a WAV round trip
through moviepy, an FFT resample of the whole track with scipy, one forward pass
over the whole track, then "pad to 1024 rows, PCA over the hidden dims, mean over
that same axis" -- a mean of centred projections, i.e. zero by construction.  The
maximum |v| it gives is written to the summary so the benchmark can show it.

    python benchmarks/old_method.py CATALOGUE.json --model PATH --out DIR [--device cpu]

CATALOGUE is {key: {"url": ...}}; DIR gets the old three JSON files plus summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from moviepy import AudioFileClip
from scipy import signal
from scipy.io import wavfile
from sklearn.decomposition import PCA
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

TARGET_RATE_HZ = 16_000
POOL_ROWS = 1024


def download_whole(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
    dest.write_bytes(body)


def extract_audio(video_path: Path, wav_path: Path) -> tuple[float, int]:
    """moviepy writes a 44.1 kHz 16-bit WAV; returns (duration_s, channels)."""
    clip = AudioFileClip(str(video_path))
    try:
        clip.write_audiofile(str(wav_path), logger=None)
        return float(clip.duration), int(clip.nchannels)
    finally:
        clip.close()


def load_resampled(wav_path: Path) -> np.ndarray:
    rate_hz, data = wavfile.read(wav_path)
    audio = data.astype(np.float32)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    audio = audio / max(float(np.max(np.abs(audio))), 1e-9)
    return signal.resample(audio, int(len(audio) * TARGET_RATE_HZ / rate_hz))


def old_pooling(hidden: np.ndarray) -> np.ndarray:
    """As the old script did it: pad to 1024 rows, PCA with the hidden dims as features,
    then the mean of the projections over the rows PCA just centred -- zero."""
    if hidden.shape[0] < POOL_ROWS:
        hidden = np.pad(hidden, ((0, POOL_ROWS - hidden.shape[0]), (0, 0)))
    projected = PCA().fit_transform(hidden)
    return projected.mean(axis=0)


class OldEmbedder:
    def __init__(self, model_path: str, device: str) -> None:
        self.device = torch.device(device)
        self.processor = Wav2Vec2FeatureExtractor.from_pretrained(model_path)
        self.model = Wav2Vec2Model.from_pretrained(model_path).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, audio: np.ndarray) -> np.ndarray:
        inputs = self.processor(audio, sampling_rate=TARGET_RATE_HZ, return_tensors="pt")
        values = inputs.input_values.to(self.device)
        hidden = self.model(values).last_hidden_state[0].float().cpu().numpy()
        return old_pooling(hidden)


def process_video(url: str, embed: OldEmbedder, workdir: Path) -> tuple[np.ndarray, dict]:
    start_s = time.time()
    video_path, wav_path = workdir / "temp_video.mp4", workdir / "temp_audio.wav"
    download_whole(url, video_path)
    duration_s, channels = extract_audio(video_path, wav_path)
    vector = embed(load_resampled(wav_path))
    process = {
        "video_duration": duration_s,
        "channels_count": channels,
        "processing_audio_time": time.time() - start_s,
    }
    return vector, process


def run(catalogue: dict, embed: OldEmbedder, out: Path) -> dict:
    vectors, processes, failures = {}, {}, {}
    for key, record in catalogue.items():
        try:
            vector, processes[key] = process_video(record["url"], embed, out)
            vectors[key] = [vector.tolist()]
        except Exception as exc:  # the old script logged and moved on
            failures[key] = {"url": record.get("url"), "error": str(exc)}
    for name, data in (
        ("audio_vectors.json", vectors),
        ("audio_process.json", processes),
        ("audio_fail.json", failures),
    ):
        (out / name).write_text(json.dumps(data))
    max_abs = max((float(np.max(np.abs(v))) for v in vectors.values()), default=0.0)
    audio_s = sum(p["video_duration"] for p in processes.values())
    return {"videos": len(vectors), "failed": len(failures), "audio_s": audio_s, "max_abs": max_abs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalogue", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    embed = OldEmbedder(args.model, args.device)
    summary = run(json.loads(args.catalogue.read_text()), embed, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
