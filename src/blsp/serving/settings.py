"""``ServerSettings``: what ``blsp serve`` allows and how it batches; its defaults are the flags' defaults.

Kept apart from the request schemas so that ``blsp serve --help`` reads the defaults without
importing the server.
"""

from __future__ import annotations

from dataclasses import dataclass

from blsp.data.audio import AudioLimits


@dataclass
class ServerSettings:
    """What ``blsp serve`` allows and how it batches (see ``blsp serve --help`` and docs/SECURITY.md)."""

    model_name: str = "blsp"
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_body_mb: float = 25.0
    max_audio_seconds: float = 120.0
    max_tokens_limit: int = 512
    default_max_tokens: int = 256
    allow_local_files: str | None = None  # a folder root; None = never
    allow_urls: bool = False
    allow_private_urls: bool = False
    url_timeout_s: float = 10.0
    translation_language: str = "English"
    translation_source_language: str | None = None
    max_queue: int = 256
    # per-request budgets, checked before any audio is decoded
    max_messages: int = 64
    max_audio_parts: int = 8
    max_total_audio_seconds: float = 300.0
    max_text_chars: int = 100_000
    max_audio_samples: int = 16_000_000
    decode_workers: int = 2
    request_timeout_s: float = 300.0
    # access
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None  # None: no Host check
    cors_origins: tuple[str, ...] = ()

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def audio_limits(self) -> AudioLimits:
        return AudioLimits(
            max_seconds=self.max_audio_seconds,
            max_bytes=self.max_body_bytes,
            max_samples=self.max_audio_samples,
        )
