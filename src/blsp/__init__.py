"""BLSP: bootstrapping language-speech pre-training via behavior alignment.

A frozen Whisper encoder, a small trainable modality adapter and a frozen instruction-following
LLM. Heavy modules are imported lazily so that ``import blsp`` and ``blsp --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "BlspConfig": "blsp.models.configuration_blsp",
    "BlspModel": "blsp.models.modeling_blsp",
    "BlspError": "blsp.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from blsp.errors import BlspError
    from blsp.models.configuration_blsp import BlspConfig
    from blsp.models.modeling_blsp import BlspModel


def _install_transformers_hooks() -> None:
    from blsp.models.auto import install

    install()


_install_transformers_hooks()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blsp' has no attribute {name!r}")


__all__ = ["BlspConfig", "BlspError", "BlspModel", "__version__"]
