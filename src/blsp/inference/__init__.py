"""Inference: ``SpeechPipeline`` (Python API), ``ChatSession`` (multi-turn, KV cache kept), batch generation.

    >>> from blsp.inference import SpeechPipeline
    >>> pipe = SpeechPipeline.from_pretrained("runs/blsp/final")
    >>> pipe("clip.wav", "Please repeat the following words.")

Heavy modules load on first use, so ``import blsp.inference`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "SpeechPipeline": "blsp.inference.pipeline",
    "ChatSession": "blsp.inference.chat",
    "GenerationParams": "blsp.models.generation_blsp",
    "GenerationResult": "blsp.models.generation_blsp",
    "AudioLimits": "blsp.inference.audio_input",
}

if TYPE_CHECKING:  # pragma: no cover
    from blsp.inference.audio_input import AudioLimits
    from blsp.inference.chat import ChatSession
    from blsp.inference.pipeline import SpeechPipeline
    from blsp.models.generation_blsp import GenerationParams, GenerationResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blsp.inference' has no attribute {name!r}")


__all__ = ["AudioLimits", "ChatSession", "GenerationParams", "GenerationResult", "SpeechPipeline"]
