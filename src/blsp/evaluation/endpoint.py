"""An OpenAI-compatible chat endpoint as an evaluation system (``endpoint:URL[#model]``).

Another ``blsp serve``, a vLLM-served Ultravox or a hosted API is measured with the same test sets
and metrics as the local systems of :mod:`blsp.evaluation.systems`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from blsp.data.audio import SAMPLE_RATE
from blsp.errors import BlspError
from blsp.evaluation.systems import ModelHandle, System


class EndpointClient:
    """The ``generate`` of a ``BlspModel``, answered by an OpenAI-compatible chat endpoint.

    Each conversation becomes one chat request: text parts as text, speech as an ``input_audio``
    part (32-bit float WAV, so the server decodes the very samples evaluated here), a transcript as
    a text part after the instruction. Greedy (temperature 0). It has no logits: the token KL of
    behavior alignment and the content check are not measured through it.
    """

    supports_logits = False

    def __init__(
        self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300.0
    ) -> None:
        try:
            import openai
        except ImportError as e:
            raise BlspError("an endpoint system needs the openai package (pip install openai)") from e
        import os

        self.base_url = base_url
        key = api_key or os.environ.get("BLSP_ENDPOINT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.client = openai.OpenAI(base_url=base_url, api_key=key or "EMPTY", timeout=timeout, max_retries=2)
        self._model = model
        self.concurrency = 4

    @property
    def model(self) -> str:
        if self._model is None:
            ids = [m.id for m in self.client.models.list().data]
            if not ids:
                raise BlspError(
                    f"{self.base_url}: the endpoint lists no model; name one with endpoint:URL#MODEL"
                )
            self._model = ids[0]
        return self._model

    @staticmethod
    def message(conversation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """A BLSP conversation as OpenAI chat messages."""
        import base64
        import io

        import soundfile as sf

        out = []
        for turn in conversation:
            content = turn["content"]
            if isinstance(content, str):
                out.append({"role": turn["role"], "content": content})
                continue
            parts = []
            for part in content:
                if part["type"] == "audio":
                    buf = io.BytesIO()
                    sf.write(
                        buf,
                        np.asarray(part["audio"], dtype=np.float32),
                        SAMPLE_RATE,
                        subtype="FLOAT",
                        format="WAV",
                    )
                    data = base64.b64encode(buf.getvalue()).decode("ascii")
                    parts.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
                else:  # text, or a transcript on the text path
                    parts.append({"type": "text", "text": part["text"]})
            out.append({"role": turn["role"], "content": parts})
        return out

    def _one(self, conversation: Sequence[dict[str, Any]], max_new_tokens: int) -> str:
        r = self.client.chat.completions.create(
            model=self.model, messages=self.message(conversation), max_tokens=max_new_tokens, temperature=0.0
        )
        if not r.choices:
            raise BlspError(f"{self.base_url}: the endpoint answered without a choice")
        return r.choices[0].message.content or ""

    def generate(self, examples: Sequence[dict[str, Any]], max_new_tokens: int = 64, **_: Any) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        convs = [ex["conversation"] for ex in examples]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(convs)))) as pool:
            return list(pool.map(lambda c: self._one(c, max_new_tokens), convs))


class EndpointSystem(System):
    """A served speech LLM behind ``/v1/chat/completions``: speech as ``input_audio``, or (on the
    text path of behavior alignment) the transcript as text."""

    kind = "endpoint"

    def __init__(self, url: str, name: str = "endpoint") -> None:
        base_url, _, model = url.partition("#")
        self.url = url
        super().__init__(name, ModelHandle(EndpointClient(base_url, model or None)))

    def conversation(self, instruction, item, audio, transcript):
        from blsp.models.prompt import make_conversation

        if audio is None:
            raise BlspError(f"item {item.get('id')!r}: no audio")
        return make_conversation(instruction, audio=audio)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "model": self.url}
