"""Disk cache of frozen-encoder outputs, one safetensors file per utterance.

The encoder is frozen during adapter training, so its output for a clip never changes: encoding
it once and reading it back on later epochs, recipes and runs saves most of the encoder's cost.
An entry is keyed by the audio's identity (resolved path, segment, size, modification time) and
lives under a folder named by the encoder's fingerprint (a hash of its weights, its feature
extractor settings and the encoder code), so a different encoder or a changed file never reads a
stale entry. Entries are written atomically (temporary file + rename) so concurrent ranks and
killed runs never leave a torn file behind.

Entries are stored in the cache dtype, and a freshly computed state is rounded to it before use
(:meth:`EncoderCache.round`), so a cold and a warm cache give bit-identical batches. A folder that
cannot be written (read-only, full disk) is a warning, logged once: training goes on, reading
what entries there are and storing no more.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from blsp.utils.torch import torch_dtype

log = logging.getLogger(__name__)

CACHE_VERSION = 1


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
        self.dtype = torch_dtype(dtype) or torch.float32
        # counted by the training process (lookups may run in DataLoader workers)
        self.served = 0
        self.encoded = 0
        self.writable = True
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._stop_writing(e)

    def _stop_writing(self, e: OSError) -> None:
        """Warn (once) that entries cannot be stored, and store no more."""
        if self.writable:
            log.warning(
                "encoder cache %s cannot be written (%s); training goes on without caching new states",
                self.root,
                e.strerror or e,
            )
        self.writable = False

    def round(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` as the cache returns it: in the cache dtype (what a later hit would give)."""
        return hidden.to(self.dtype)

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
        if hidden.dtype != self.dtype:  # written with another data.cache_dtype: recompute it
            return None
        return hidden, frames

    def put(self, ref: str, hidden: torch.Tensor, frames: int) -> None:
        """Store ``hidden`` (in the cache dtype); a write that fails stops the storing, with a warning."""
        from safetensors.torch import save

        path = self._path(ref) if self.writable else None
        if path is None:
            return
        tensor = hidden.detach().to("cpu", self.dtype).contiguous()
        data = save({"hidden": tensor}, metadata={"frames": str(int(frames)), "ref": ref})
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:  # read-only folder, full disk, quota
            self._stop_writing(e)
        finally:
            if tmp is not None and os.path.exists(tmp):
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
