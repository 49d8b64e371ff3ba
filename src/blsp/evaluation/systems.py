"""The systems compared in the paper (section 4.2), behind one interface.

- :class:`BlspSystem`: a saved adapter folder (BLSP, BLSP+RP, ASR pretraining, any checkpoint)
  loaded with ``BlspModel.from_pretrained``; the speech goes through encoder + adapter.
- :class:`TextSystem` (Text+LLM): the ground-truth transcript through the same prompt builder's
  text path.
- :class:`~blsp.evaluation.endpoint.EndpointSystem`: any OpenAI-compatible ``/v1/chat/completions`` server that takes
  ``input_audio`` parts (another ``blsp serve``, a vLLM-served Ultravox, a hosted API), so that
  peers are measured with the same sets and metrics.
- :class:`CascadeSystem`: a transcriber's output through the text path: Whisper+LLM
  (``blsp.models.asr.WhisperTranscriber``) or CTC+LLM (any object with
  ``transcribe(audios) -> list[str]``); its standalone ASR is scored too (paper Table 2).

Every system builds one conversation per item (``make_conversation``) and generates with its
:class:`ModelHandle`'s ``BlspModel``. Models load lazily and once: adapter folders trained for the
same config share one :class:`SharedModel` (one encoder and one LLM in memory; each system swaps
its adapter in, ``BlspModel.load_adapter``), and Text+LLM and the cascades, which need an LLM and
its prompt builder only, use the first BLSP system's model.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from blsp.errors import BlspError
from blsp.models.hub import DEFAULT_WHISPER

log = logging.getLogger(__name__)


class Transcriber(Protocol):
    def transcribe(self, audios: list[np.ndarray]) -> list[str]: ...


class SharedModel:
    """One loaded ``BlspModel`` for several adapter folders of one config, and whose adapter is in it."""

    def __init__(self) -> None:
        self.model: Any = None
        self.current: ModelHandle | None = None
        self.users: set[int] = set()  # ids of the handles that may still use it


class ModelHandle:
    """A ``BlspModel`` loaded on first use from an adapter folder, a ``BlspConfig`` or given ready.

    With ``shared``, the encoder and LLM are those of every handle of the same :class:`SharedModel`:
    the first use loads them, later ones swap this folder's adapter in from its file.
    """

    def __init__(
        self, source: Any, device: str | None = None, dtype: Any = None, shared: SharedModel | None = None
    ) -> None:
        self.source = source
        self.device = device
        self.dtype = dtype
        self._model: Any = source if _is_model(source) else None
        self._owned = self._model is None
        self._error: Exception | None = None
        self.shared = shared if isinstance(source, str | Path) else None
        if self.shared is not None:
            self.shared.users.add(id(self))

    @property
    def label(self) -> str:
        if _is_model(self.source):
            return f"model:{type(self.source).__name__}"
        if isinstance(self.source, str | Path):
            return str(self.source)
        return (
            f"config(encoder={getattr(self.source, 'encoder', '?')}, llm={getattr(self.source, 'llm', '?')})"
        )

    @property
    def loaded(self) -> bool:
        return (self.shared.model if self.shared is not None else self._model) is not None

    def get(self) -> Any:
        """The model, loaded on first call; a load that failed fails again at once (not reloaded per batch)."""
        if self.shared is not None:
            return self._get_shared(self.shared)
        if self._model is None:
            if self._error is not None:
                raise self._error
            from blsp.models.modeling_blsp import BlspModel

            try:
                if isinstance(self.source, str | Path):
                    log.info("loading BLSP model from %s", self.source)
                    self._model = BlspModel.from_pretrained(self.source, device=self.device, dtype=self.dtype)
                else:
                    log.info("building BLSP model from %s", self.label)
                    self._model = BlspModel.from_config(self.source, device=self.device, dtype=self.dtype)
            except Exception as e:
                self._error = e
                raise
        return self._model

    def _get_shared(self, sh: SharedModel) -> Any:
        if self._error is not None:
            raise self._error
        sh.users.add(id(self))
        try:
            if sh.model is None:
                sh.model, sh.current = self._load_own(), self
            elif sh.current is not self:
                log.info("swapping in the adapter of %s (encoder and LLM already loaded)", self.source)
                sh.model.load_adapter(self.source)
                sh.current = self
        except Exception as e:
            self._error = e
            raise
        return sh.model

    def _load_own(self) -> Any:
        from blsp.models.modeling_blsp import BlspModel

        log.info("loading BLSP model from %s", self.source)
        return BlspModel.from_pretrained(self.source, device=self.device, dtype=self.dtype)

    def release(self) -> None:
        """Drop a model this handle loaded itself (a model given ready is kept); a shared model goes
        when its last handle is released."""
        if self.shared is not None:
            self.shared.users.discard(id(self))
            if not self.shared.users and self.shared.model is not None:
                self.shared.model, self.shared.current = None, None
                import gc

                gc.collect()
            return
        if self._owned and self._model is not None:
            self._model = None
            import gc

            gc.collect()


def _is_model(obj: Any) -> bool:
    return callable(getattr(obj, "generate", None))


class System:
    """Base: a named way of answering an instruction about an utterance."""

    kind = "system"
    uses_audio = True  # needs the utterance's audio (False: only its transcript)

    def __init__(self, name: str, model: ModelHandle) -> None:
        self.name = name
        self.model_handle = model

    @property
    def model(self) -> Any:
        return self.model_handle.get()

    def transcribe(
        self, items: Sequence[dict[str, Any]], audios: Sequence[np.ndarray | None]
    ) -> list[str | Exception] | None:
        """Standalone transcripts (cascades only; ``None`` for other systems)."""
        return None

    def conversation(
        self, instruction: str, item: dict[str, Any], audio: np.ndarray | None, transcript: str | None
    ) -> list[dict]:
        """The conversation this system feeds its LLM for ``item`` under ``instruction``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "model": self.model_handle.label}

    def release(self) -> None:
        """Free anything this system loaded that no other system shares."""


class BlspSystem(System):
    """Speech through the encoder and adapter of a BLSP (or ASR-pretrained, or CTC) adapter folder."""

    kind = "blsp"

    def __init__(self, source: Any, name: str | None = None, device: str | None = None) -> None:
        handle = source if isinstance(source, ModelHandle) else ModelHandle(source, device=device)
        super().__init__(
            name or (Path(str(source)).name if isinstance(source, str | Path) else "BLSP"), handle
        )

    def conversation(self, instruction, item, audio, transcript):
        from blsp.models.prompt import make_conversation

        if audio is None:
            raise BlspError(f"item {item.get('id')!r}: no audio")
        return make_conversation(instruction, audio=audio)


class TextSystem(System):
    """Text+LLM: the ground-truth transcript on the text path of the same prompt builder."""

    kind = "text"
    uses_audio = False

    def __init__(self, model: ModelHandle | Any, name: str = "Text+LLM") -> None:
        super().__init__(name, model if isinstance(model, ModelHandle) else ModelHandle(model))

    def conversation(self, instruction, item, audio, transcript):
        from blsp.models.prompt import make_conversation

        text = item.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BlspError(f"item {item.get('id')!r}: no transcript ('text') for the Text+LLM system")
        return make_conversation(instruction, transcript=text)


class CascadeSystem(System):
    """A transcriber's output on the text path: Whisper+LLM or CTC+LLM."""

    kind = "cascade"

    def __init__(
        self,
        transcriber: Transcriber | Callable[[], Transcriber],
        model: ModelHandle | Any,
        name: str = "Whisper+LLM",
        batch_size: int = 8,
    ) -> None:
        super().__init__(name, model if isinstance(model, ModelHandle) else ModelHandle(model))
        self._transcriber = transcriber if hasattr(transcriber, "transcribe") else None
        self._factory = None if self._transcriber is not None else transcriber
        self._error: Exception | None = None
        self.batch_size = batch_size

    @property
    def transcriber(self) -> Transcriber:
        if self._transcriber is None:
            if self._error is not None:
                raise self._error
            assert self._factory is not None
            try:
                self._transcriber = self._factory()
            except Exception as e:  # e.g. the ASR model cannot load: fail fast from now on
                self._error = e
                raise
        return self._transcriber

    def _call(self, audios: list[np.ndarray], lang: str | None) -> list[str]:
        fn = self.transcriber.transcribe
        try:
            takes_lang = "language" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_lang = False
        out = fn(audios, language=lang) if takes_lang and lang else fn(audios)
        if len(out) != len(audios):
            raise BlspError(f"transcriber returned {len(out)} transcripts for {len(audios)} clips")
        return [str(t) for t in out]

    def transcribe(self, items, audios):
        results: list[str | Exception] = [BlspError("no audio")] * len(items)
        idx = [i for i, a in enumerate(audios) if a is not None]
        by_lang: dict[str | None, list[int]] = {}
        for i in idx:
            by_lang.setdefault(items[i].get("lang"), []).append(i)
        for lang, ids in by_lang.items():
            for s in range(0, len(ids), self.batch_size):
                chunk = ids[s : s + self.batch_size]
                try:
                    texts = self._call([audios[i] for i in chunk], lang)
                    for i, t in zip(chunk, texts, strict=True):
                        results[i] = t
                except Exception as e:  # retry one by one: one bad clip must not sink the batch
                    log.warning("%s: transcribing a batch failed (%s); retrying one by one", self.name, e)
                    for i in chunk:
                        try:
                            results[i] = self._call([audios[i]], lang)[0]
                        except Exception as e1:
                            results[i] = e1
        return results

    def conversation(self, instruction, item, audio, transcript):
        from blsp.models.prompt import make_conversation

        if transcript is None:
            raise BlspError(f"item {item.get('id')!r}: no transcript from {self.name}'s ASR")
        return make_conversation(instruction, transcript=transcript)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["transcriber"] = type(self._transcriber).__name__ if self._transcriber is not None else "lazy"
        return d

    def release(self) -> None:
        if self._factory is not None:
            self._transcriber = None


def whisper_transcriber(ref: str = DEFAULT_WHISPER, device: str = "cpu") -> Callable[[], Transcriber]:
    """A lazy factory of ``blsp.models.asr.WhisperTranscriber(ref)``."""

    def make() -> Transcriber:
        from blsp.models.asr import WhisperTranscriber

        return WhisperTranscriber(ref, device=device)

    return make


def ctc_transcriber(path: str | Path, device: str | None = None) -> Callable[[], Transcriber]:
    """A lazy factory of the CTC baseline's transcriber for a CTC adapter folder."""

    def make() -> Transcriber:
        try:
            from blsp.models.ctc import CtcTranscriber
        except ImportError as e:
            raise BlspError(f"the CTC baseline is not available in this install ({e})") from e
        return CtcTranscriber.from_pretrained(path, device=device)

    return make
