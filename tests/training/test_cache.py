"""The encoder-state cache on a disk that refuses writes: one warning, no torn files, no crash."""

from __future__ import annotations

import contextlib
import os
import resource
import signal

import pytest
import torch

from blsp.training.cache import EncoderCache


@contextlib.contextmanager
def _max_file_size(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG, as on a full disk (works for root too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _clips(folder, n: int) -> list[str]:
    refs = []
    for i in range(n):
        p = folder / f"clip{i}.wav"
        p.write_bytes(b"RIFF" + bytes([i]) * 64)  # the cache keys on the file's identity only
        refs.append(str(p))
    return refs


def _cache_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_full_disk_stops_the_storing_with_one_warning(tmp_path, caplog):
    cache = EncoderCache(tmp_path / "cache", "f" * 64, "float16")
    refs = _clips(tmp_path, 3)
    hidden = torch.randn(200, 32)
    with caplog.at_level("WARNING"), _max_file_size(1024):  # an entry takes ~13 kB
        for ref in refs:
            cache.put(ref, hidden, 400)
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and "File too large" in warnings[0].getMessage()
    assert not cache.writable
    assert _cache_files(tmp_path / "cache") == []  # no torn or temporary file left behind
    assert cache.get(refs[0]) is None
    cache.put(refs[0], hidden, 400)  # stays off: no retry, no second warning
    assert _cache_files(tmp_path / "cache") == [] and len(caplog.records) == len(warnings)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_is_read_but_not_written(tmp_path, caplog):
    refs = _clips(tmp_path, 2)
    hidden = torch.randn(10, 4)
    EncoderCache(tmp_path / "cache", "f" * 64, "float16").put(refs[0], hidden, 20)
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_dir():
            p.chmod(0o555)
    (tmp_path / "cache").chmod(0o555)
    try:
        cache = EncoderCache(tmp_path / "cache", "f" * 64, "float16")
        with caplog.at_level("WARNING"):
            cache.put(refs[1], hidden, 20)
            cache.put(refs[1], hidden, 20)
        assert not cache.writable
        assert len([r for r in caplog.records if "cannot be written" in r.getMessage()]) == 1
        got, frames = cache.get(refs[0])  # what is there is still served
        assert torch.equal(got, hidden.half()) and frames == 20
    finally:
        for p in [tmp_path / "cache", *(tmp_path / "cache").rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


def test_a_miss_is_rounded_as_a_hit_comes_back(tmp_path):
    ref = _clips(tmp_path, 1)[0]
    cache = EncoderCache(tmp_path / "cache", "f" * 64, "bfloat16")
    fresh = torch.randn(50, 8)
    used = cache.round(fresh)
    cache.put(ref, used, 100)
    hit, _ = cache.get(ref)
    assert not torch.equal(used.float(), fresh) and torch.equal(hit, used)
    # an entry of another cache_dtype is recomputed, not served in the wrong precision
    assert EncoderCache(tmp_path / "cache", "f" * 64, "float32").get(ref) is None
