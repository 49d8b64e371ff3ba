"""``transformers`` integration: ``AutoConfig``/``AutoModel`` and a ``pipeline`` task for BLSP.

``import blsp`` stays light: it does not import ``transformers``. It installs an import hook
instead, and the BLSP classes are registered the moment ``transformers``' auto classes or its
pipelines are imported (or at once, if they already are). After that::

    import blsp
    from transformers import AutoModel, pipeline

    model = AutoModel.from_pretrained("path/to/adapter")        # a BlspModel
    pipe = pipeline("blsp", model="path/to/adapter")
    pipe("clip.wav", instruction="Please repeat the following words.")
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from typing import Any

_AUTO = "transformers.models.auto.modeling_auto"
_PIPELINES = "transformers.pipelines"
_BLSP_PIPELINE = "blsp.inference.transformers_pipeline"
_lock = threading.Lock()
_done: set[str] = set()


def register(part: str) -> None:
    """Register the BLSP classes with one ``transformers`` module (idempotent)."""
    with _lock:
        if part in _done:
            return
        _done.add(part)
    if part == _AUTO:
        from transformers import AutoConfig, AutoModel

        from blsp.models.configuration_blsp import BlspConfig
        from blsp.models.modeling_blsp import BlspModel

        AutoConfig.register(BlspConfig.model_type, BlspConfig, exist_ok=True)
        AutoModel.register(BlspConfig, BlspModel, exist_ok=True)
    elif part == _PIPELINES:
        register(_AUTO)
        module = sys.modules.get(_BLSP_PIPELINE)
        if module is not None and not hasattr(module, "BlspPipeline"):
            # That module is importing transformers.pipelines right now (its first import): it
            # registers the task itself once BlspPipeline exists.
            return
        import blsp.inference.transformers_pipeline  # noqa: F401  (registers the "blsp" task on import)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wrap the loader of the two ``transformers`` modules so that ``register`` runs after them."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in (_AUTO, _PIPELINES) or name in _done:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            register(name)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now for what ``transformers`` has imported, and hook what it will import."""
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
    for name in (_AUTO, _PIPELINES):
        if name in sys.modules:
            register(name)
