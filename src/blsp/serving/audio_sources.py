"""Audio parts of a request: where they come from, the server's permissions, and decoding.

:func:`blsp.serving.messages.plan_messages` turns each audio part into an :class:`AudioRef`
(encoded bytes, a URL, a path) without decoding; :func:`fetch_audio` fetches (a URL only when
the operator allows it, public addresses only unless ``--allow-private-urls``; a local file only
under ``--local-files-root``), reads headers, checks every header-known budget for all clips and
the prompt length, and only then decodes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blsp.data.audio import (
    FFMPEG_FORMATS,
    SAMPLE_RATE,
    UNKNOWN_FRAMES,
    decode_audio_bytes,
    normalize_format,
)
from blsp.errors import AudioError
from blsp.inference.audio_input import base64_audio_bytes, read_audio_file
from blsp.serving.openai_api import ApiError, budget_error, short_repr
from blsp.serving.settings import ServerSettings


@dataclass
class AudioRef:
    """An audio part before decoding: where it comes from, and its header facts once known."""

    where: str
    data: bytes | None = None  # encoded audio
    fmt: str | None = None  # a format hint (name or MIME type)
    url: str | None = None  # http(s), fetched when loaded
    path: str | None = None  # a local file (``path[:start:num]``), checked against the root when loaded
    samplerate: int = 0
    channels: int = 0
    frames: int | None = None  # None: not known before decoding (ffmpeg formats, unreadable header)

    @property
    def seconds(self) -> float | None:
        return self.frames / self.samplerate if self.frames is not None and self.samplerate else None

    @property
    def samples_16k(self) -> int:
        """A lower bound on the 16 kHz samples it decodes to (0 when unknown)."""
        if self.frames is None or not self.samplerate:
            return 0
        return max(0, self.frames * SAMPLE_RATE // self.samplerate - 1)


def source_ref(url: str, where: str, settings: ServerSettings) -> AudioRef:
    """An ``audio_url`` as a reference, refused at once when the server does not allow its kind."""
    if url.startswith("data:"):
        data, fmt = base64_audio_bytes(url, None, source=where, limits=settings.audio_limits)
        return AudioRef(where, data=data, fmt=fmt)
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        if not settings.allow_urls:
            raise ApiError(
                400,
                f"{where}: fetching audio from URLs is disabled on this server (the operator can enable it "
                "with --allow-urls); send the audio inline as input_audio base64 data",
                param=where,
                code="url_not_allowed",
            )
        return AudioRef(where, url=url)
    if scheme in ("file", ""):
        if settings.allow_local_files is None:
            raise ApiError(
                400,
                f"{where}: reading local files is disabled on this server (the operator can enable it "
                "with --allow-local-files); send the audio inline as input_audio base64 data",
                param=where,
                code="local_files_not_allowed",
            )
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(url).path) if scheme == "file" else url
        if "\x00" in path:
            raise ApiError(400, f"{where}: the path contains a NUL character", param=where)
        return AudioRef(where, path=path)
    raise ApiError(
        400, f"{where}: unsupported URL scheme {scheme!r} (use data:, or input_audio)", param=where
    )


def local_file(ref: str, where: str, settings: ServerSettings) -> str:
    """``ref`` (``path[:start:num]``) resolved strictly under the allowed root; 403 for anything outside.

    The segment suffix is split off first, so the file itself is resolved; relative paths are
    relative to the root; a symlink whose target leaves the root is refused.
    """
    from blsp.data.audio import format_audio_ref, parse_audio_ref

    if settings.allow_local_files is None:
        raise ApiError(
            400, f"{where}: reading local files is disabled", param=where, code="local_files_not_allowed"
        )
    root = Path(settings.allow_local_files).resolve(strict=True)
    path, start, num = parse_audio_ref(ref)
    lexical = Path(os.path.normpath(root / path))
    outside = ApiError(
        403,
        f"{where}: {path} is outside the folder this server may read ({root})",
        param=where,
        code="local_files_not_allowed",
    )
    if not lexical.is_relative_to(root):
        raise outside
    try:
        real = lexical.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise ApiError(
            400, f"{where}: {path}: audio file not found", param=where, code="invalid_audio"
        ) from e
    if not real.is_relative_to(root):
        raise outside
    if not real.is_file():
        raise ApiError(400, f"{where}: {path}: not a regular file", param=where, code="invalid_audio")
    return format_audio_ref(real, start, num)


def _refuse_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def fetch(url: str, where: str, settings: ServerSettings) -> tuple[bytes, str | None]:
    """GET ``url`` within ``url_timeout_s`` in all (DNS, connect, every read), at most ``max_body_bytes``.

    Unless ``allow_private_urls``, every address the host resolves to must be public (not
    loopback, link-local, private, shared or reserved), and the request goes to the address that
    was checked, so a second DNS answer cannot point it elsewhere. Redirects are not followed.
    """
    try:
        return asyncio.run(asyncio.wait_for(_fetch(url, where, settings), settings.url_timeout_s))
    except TimeoutError as e:
        raise ApiError(
            400,
            f"{where}: fetching {short_repr(url)} took longer than {settings.url_timeout_s:g} s (--url-timeout-s)",
            param=where,
            code="url_timeout",
        ) from e


async def _fetch(url: str, where: str, settings: ServerSettings) -> tuple[bytes, str | None]:
    import socket
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    host, scheme = parts.hostname, parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise ApiError(400, f"{where}: invalid port in {short_repr(url)}", param=where) from e
    if not host:
        raise ApiError(400, f"{where}: the URL has no host", param=where)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ApiError(
            400, f"{where}: cannot resolve {host!r} ({e})", param=where, code="url_not_allowed"
        ) from e
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addrs:
        raise ApiError(400, f"{where}: {host!r} has no address", param=where)
    if not settings.allow_private_urls:
        for ip in addrs:
            if _refuse_address(ip):
                raise ApiError(
                    400,
                    f"{where}: {host!r} resolves to {ip}, a loopback, link-local or private address; this "
                    "server fetches public addresses only (the operator can allow others with "
                    "--allow-private-urls)",
                    param=where,
                    code="url_not_allowed",
                )
    ip = addrs[0]
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    pinned = parts._replace(netloc=netloc).geturl()
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    limit = settings.max_body_bytes
    try:
        async with (
            httpx.AsyncClient(trust_env=False, follow_redirects=False) as client,
            client.stream(
                "GET",
                pinned,
                headers={"Host": host_header},
                extensions={"sni_hostname": host} if scheme == "https" else {},
            ) as r,
        ):
            if r.status_code != 200:
                raise ApiError(
                    400, f"{where}: fetching {short_repr(url)} answered HTTP {r.status_code}", param=where
                )
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413, f"{where}: {short_repr(url)} is larger than {limit} bytes", param=where
                    )
                chunks.append(chunk)
            ctype = r.headers.get("content-type", "")
    except httpx.HTTPError as e:
        raise ApiError(400, f"{where}: cannot fetch {short_repr(url)} ({e})", param=where) from e
    return b"".join(chunks), ctype if ctype.startswith("audio/") else None


def input_audio_ref(part: dict[str, Any], where: str, settings: ServerSettings) -> AudioRef:
    kind = part["type"]
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise ApiError(
                400, f"{where}.input_audio must be an object with 'data' and 'format'", param=where
            )
        data = spec.get("data")
        if not isinstance(data, str) or not data:
            raise ApiError(
                400,
                f"{where}.input_audio.data must be a non-empty base64 string",
                param=f"{where}.input_audio.data",
            )
        fmt = spec.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise ApiError(
                400, f"{where}.input_audio.format must be a string", param=f"{where}.input_audio.format"
            )
        source = f"{where}.input_audio"
        normalize_format(fmt, source)
        raw, fmt = base64_audio_bytes(data, fmt, source=source, limits=settings.audio_limits)
        return AudioRef(source, data=raw, fmt=fmt)
    spec = part.get("audio_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}.audio_url must be an object with a 'url' string", param=where)
    return source_ref(url, f"{where}.audio_url", settings)


def _read_header(ref: AudioRef) -> None:
    """Fill in the header facts of ``ref`` (only the header is read; unknown stays None)."""
    from blsp.data.audio import FFMPEG_EXTENSIONS, audio_bytes_info, audio_info

    try:
        if ref.data is not None:
            fmt = normalize_format(ref.fmt, ref.where)
            info = None if fmt in FFMPEG_FORMATS else audio_bytes_info(ref.data, ref.where)
        else:
            info = (
                None
                if Path(ref.path or "").suffix.lower() in FFMPEG_EXTENSIONS
                else audio_info(ref.path or "")
            )
    except AudioError:
        info = None  # the decoder says why
    if info is not None and info.samplerate > 0 and 0 <= info.frames < UNKNOWN_FRAMES:
        ref.samplerate, ref.channels, ref.frames = info.samplerate, max(1, info.channels), info.frames


def _check_total(seconds: float, settings: ServerSettings) -> None:
    if seconds > settings.max_total_audio_seconds + 1e-6:
        raise budget_error(
            f"the request's audio is {seconds:.1f} s in all",
            f"{settings.max_total_audio_seconds:g} s of audio per request",
            "--max-total-audio-seconds",
            "messages",
        )


def _with_samples(conv: list[dict[str, Any]], samples: dict[int, int]) -> list[dict[str, Any]]:
    def part(p: dict[str, Any]) -> dict[str, Any]:
        if p.get("type") == "audio":
            return {"type": "audio", "samples": samples[id(p["audio"])]}
        return p

    return [
        m if isinstance(m["content"], str) else {**m, "content": [part(p) for p in m["content"]]}
        for m in conv
    ]


def fetch_audio(
    conv: list[dict[str, Any]],
    refs: list[AudioRef],
    settings: ServerSettings,
    check_prompt: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Fetch, budget-check and decode the audio of a planned conversation (blocking: run it off the loop).

    Every budget that a header can tell (per clip: seconds and ``channels x frames``; per request:
    total seconds; the prompt's length against the context window, via ``check_prompt`` on a
    conversation whose audio parts are ``{"type": "audio", "samples": n}``) is checked for all
    clips before the first one is decoded; the totals are checked again on the decoded lengths.
    """
    limits = settings.audio_limits
    for ref in refs:
        if ref.url is not None:
            ref.data, ref.fmt = fetch(ref.url, ref.where, settings)
        elif ref.path is not None:
            ref.path = local_file(ref.path, ref.where, settings)
        _read_header(ref)
        if ref.seconds is not None and ref.seconds > settings.max_audio_seconds + 1e-6:
            raise ApiError(
                400,
                f"{ref.where}: audio is {ref.seconds:.1f} s long; the limit is {settings.max_audio_seconds:g} s "
                "(--max-audio-seconds)",
                param=ref.where,
                code="audio_too_long",
            )
        if ref.frames is not None and ref.channels * ref.frames > settings.max_audio_samples:
            raise ApiError(
                400,
                f"{ref.where}: audio would decode to {ref.channels} channels x {ref.frames} frames at "
                f"{ref.samplerate} Hz = {ref.channels * ref.frames} samples; this server decodes at most "
                f"{settings.max_audio_samples} samples per clip (--max-audio-samples)",
                param=ref.where,
                code="audio_too_large",
            )
    _check_total(sum(r.seconds or 0.0 for r in refs), settings)
    if check_prompt is not None:
        check_prompt(_with_samples(conv, {id(r): r.samples_16k for r in refs}))
    wavs: dict[int, Any] = {}
    for ref in refs:
        try:
            if ref.data is not None:
                wav = decode_audio_bytes(ref.data, ref.fmt, source=ref.where, limits=limits)
            else:
                wav = read_audio_file(ref.path or "", limits=limits)
        except AudioError as e:
            msg = str(e) if str(e).startswith(ref.where) else f"{ref.where}: {e}"
            raise ApiError(400, msg, param=ref.where, code="invalid_audio") from e
        wavs[id(ref)] = wav
    _check_total(sum(len(w) for w in wavs.values()) / SAMPLE_RATE, settings)
    if check_prompt is not None and any(r.frames is None for r in refs):
        check_prompt(_with_samples(conv, {k: len(w) for k, w in wavs.items()}))

    def part(p: dict[str, Any]) -> dict[str, Any]:
        return {"type": "audio", "audio": wavs[id(p["audio"])]} if p.get("type") == "audio" else p

    return [
        m if isinstance(m["content"], str) else {**m, "content": [part(p) for p in m["content"]]}
        for m in conv
    ]
