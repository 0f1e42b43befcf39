"""Audio files as the speech task sees them: mono float32 samples at one sampling rate.

WAV is read with the standard library (``wave``: 8/16/32-bit PCM, any channel count); other
formats (FLAC, OGG) need the optional ``soundfile`` package. Resampling is band-limited (FFT),
exact enough for clips of seconds, with no extra dependency.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np

PCM_DTYPES = {1: np.uint8, 2: np.int16, 4: np.int32}


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling by zero-padding or truncating the spectrum."""
    if rate == new_rate or not len(samples):
        return samples.astype(np.float32)
    length = max(1, round(len(samples) * new_rate / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    return (np.fft.irfft(spectrum, n=length) * (length / len(samples))).astype(np.float32)


def read_file(path: str) -> bytes:
    """A file's bytes from a local path or a URI (s3://, gs://, hdfs://, file://: pyarrow's
    filesystems). The preprocessing that reads it may run on any node of a cluster: a URI, or a
    path every node mounts, reads the same everywhere."""
    if "://" not in path:
        return Path(path).read_bytes()
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read()


def decode(data: bytes | str, rate: int) -> np.ndarray:
    """Audio file bytes (or a path or URI) -> mono float32 samples in [-1, 1] at ``rate`` Hz.
    Raises on anything it cannot decode."""
    if isinstance(data, str):
        data = read_file(data)
    if data[:4] == b"RIFF":
        with wave.open(io.BytesIO(data)) as clip:
            width, channels, source_rate = clip.getsampwidth(), clip.getnchannels(), clip.getframerate()
            frames = clip.readframes(clip.getnframes())
        if width not in PCM_DTYPES:
            raise ValueError(f"{8 * width}-bit WAV is not supported (8, 16 or 32-bit PCM)")
        samples = np.frombuffer(frames, dtype=PCM_DTYPES[width]).astype(np.float32)
        samples = (samples - 128) / 128 if width == 1 else samples / float(2 ** (8 * width - 1))
        samples = samples.reshape(-1, channels).mean(1)
    else:
        import soundfile  # optional: FLAC, OGG, ...

        samples, source_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        samples = samples.mean(1)
    if not len(samples):
        raise ValueError("no audio samples")
    return resample(samples, source_rate, rate)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """Mono float samples in [-1, 1] -> 16-bit PCM WAV file bytes."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()
