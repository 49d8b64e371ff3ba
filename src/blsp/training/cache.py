"""Disk cache of frozen-encoder outputs, one safetensors file per utterance.

The encoder is frozen during adapter training, so its output for a clip never changes: encoding
it once and reading it back on later epochs, recipes and runs saves most of the encoder's cost.
An entry is keyed by the audio's identity (resolved path, segment, size, modification time) and
lives under a folder named by the encoder's fingerprint (a hash of its weights, its feature
extractor settings and the encoder code), so a different encoder or a changed file never reads a
stale entry. Entries are written atomically (temporary file + rename) so concurrent ranks and
killed runs never leave a torn file behind.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path

import torch

CACHE_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """Hash of a :class:`~blsp.models.encoder.SpeechEncoder`'s weights, features and code."""
    h = hashlib.sha256()
    h.update(f"blsp-encoder-cache-v{CACHE_VERSION}".encode())
    try:
        h.update(inspect.getsource(type(encoder)).encode())
    except (OSError, TypeError):
        h.update(type(encoder).__qualname__.encode())
    fe = getattr(encoder, "feature_extractor", None)
    if fe is not None:
        keys = ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "padding_value")
        h.update(json.dumps({k: getattr(fe, k, None) for k in keys}, sort_keys=True).encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def audio_identity(ref: str) -> str:
    """Identity of an audio reference: resolved path, segment, size and mtime of the file."""
    from blsp.data.audio import parse_audio_ref

    path, start, num = parse_audio_ref(ref)
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{start}|{num}|{st.st_size}|{st.st_mtime_ns}"


class EncoderCache:
    """``get(ref) -> (hidden [T', D], frames) | None`` and ``put(ref, hidden, frames)``."""

    def __init__(self, root: str | os.PathLike[str], fingerprint: str, dtype: str = "float32") -> None:
        self.root = Path(root) / fingerprint[:24]
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = _DTYPES[dtype]
        # counted by the training process (lookups may run in DataLoader workers)
        self.served = 0
        self.encoded = 0

    def _path(self, ref: str) -> Path | None:
        try:
            ident = audio_identity(ref)
        except OSError:
            return None
        key = hashlib.sha256(ident.encode("utf-8")).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, ref: str) -> tuple[torch.Tensor, int] | None:
        from safetensors import safe_open

        path = self._path(ref)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                hidden = f.get_tensor("hidden")
                frames = int(f.metadata()["frames"])
        except Exception:  # a foreign or damaged file: recompute it
            return None
        return hidden, frames

    def put(self, ref: str, hidden: torch.Tensor, frames: int) -> None:
        from safetensors.torch import save_file

        path = self._path(ref)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            tensor = hidden.detach().to("cpu", self.dtype).contiguous()
            save_file({"hidden": tensor}, tmp, metadata={"frames": str(int(frames)), "ref": ref})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
