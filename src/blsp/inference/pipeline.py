"""``SpeechPipeline``: load a BLSP adapter once, then ask it about audio.

    >>> pipe = SpeechPipeline.from_pretrained("runs/blsp/final")
    >>> pipe("question.wav", "Please repeat the following words.")
    >>> pipe(audio_array, "Summarise this.", sampling_rate=44100)
    >>> pipe(["a.wav", "b.wav"], task="st:German")          # batched
    >>> pipe.chat([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}])
    >>> for piece in pipe.stream("a.wav", "Continue the text."):
    ...     print(piece, end="", flush=True)

Any ``transformers`` streamer works too (one example at a time), the ``generate`` way::

    streamer = TextIteratorStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
    Thread(target=pipe, args=("a.wav", "Describe it."), kwargs={"streamer": streamer}).start()
    for text in streamer: ...
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from blsp.errors import BlspError
from blsp.inference.audio_input import AudioLimits
from blsp.inference.generate import PreparedExample, check_fits, prepare_conversation
from blsp.models.generation_blsp import GenerationParams, GenerationResult, generate, generate_grouped

_DONE = object()


class SpeechPipeline:
    """Speech (and text) in, text out, through a ``BlspModel``.

    Args:
        model: a loaded ``BlspModel``.
        limits: bounds applied to every audio input (seconds, bytes).
        max_new_tokens, temperature, top_p, loop_guard: defaults of every call (temperature 0 = greedy;
        ``loop_guard`` ends an answer that falls into a loop, see ``GenerationParams``).
    """

    def __init__(
        self,
        model: Any,
        *,
        limits: AudioLimits | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        loop_guard: bool = True,
    ) -> None:
        self.model = model
        self.limits = limits or AudioLimits()
        self.defaults = GenerationParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, loop_guard=loop_guard
        )

    @classmethod
    def from_pretrained(
        cls,
        adapter_dir: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: Any = None,
        quantization: str | None = None,
        **kwargs: Any,
    ) -> SpeechPipeline:
        """Load the adapter folder or shipped name (None: the shipped default) and its encoder and LLM once."""
        from blsp.models.modeling_blsp import BlspModel

        model = BlspModel.from_pretrained(adapter_dir, device=device, dtype=dtype, quantization=quantization)
        return cls(model, **kwargs)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    # ------------------------------------------------------------------ settings
    def params(
        self,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> GenerationParams:
        """Generation settings: the pipeline's defaults with the given values replaced."""
        return self.defaults.updated(max_new_tokens, temperature, top_p, stop)

    def prepare(
        self, conversation: Sequence[dict[str, Any]], source: str = "conversation"
    ) -> PreparedExample:
        """Decode and featurise a conversation's audio (see ``prepare_conversation``)."""
        return prepare_conversation(self.model, conversation, limits=self.limits, source=source)

    @staticmethod
    def conversation(
        audio: Any = None, instruction: str | None = None, sampling_rate: int | None = None
    ) -> list[dict]:
        """One user turn: the instruction then the audio (the paper's order)."""
        parts: list[dict[str, Any]] = []
        if instruction:
            parts.append({"type": "text", "text": instruction})
        if audio is not None:
            part = {"type": "audio", "audio": audio}
            if sampling_rate is not None:
                part["sampling_rate"] = sampling_rate
            parts.append(part)
        if not parts:
            raise BlspError("give audio, an instruction, or both")
        return [{"role": "user", "content": parts}]

    @staticmethod
    def instruction_for(instruction: str | None, task: str | None) -> str | None:
        """The instruction to use: ``instruction``, or the paper instruction of ``task``."""
        if task is not None:
            if instruction is not None:
                raise BlspError("give either an instruction or a task, not both")
            from blsp.instructions import task_instruction

            return task_instruction(task)
        return instruction

    # ------------------------------------------------------------------ calls
    def __call__(
        self,
        audio: Any = None,
        instruction: str | Sequence[str] | None = None,
        *,
        task: str | None = None,
        sampling_rate: int | None = None,
        batch_size: int = 8,
        streamer: Any = None,
        return_result: bool = False,
        **gen: Any,
    ) -> Any:
        """Answer ``instruction`` about ``audio``.

        ``audio`` is a path, bytes, an array (with ``sampling_rate``), a dict, or a list of these
        (then a list of answers is returned, generated ``batch_size`` at a time). ``instruction``
        may be a list matching the audio list; ``task`` names a paper task (``asr``, ``st:German``,
        ``snips``, ``fsc``, ``sentiment``). ``gen``: ``max_new_tokens``, ``temperature``,
        ``top_p``, ``stop``. ``return_result`` gives ``GenerationResult`` objects instead of text.
        """
        if isinstance(instruction, list):
            if task is not None:
                raise BlspError("give either instructions or a task, not both")
        else:
            instruction = self.instruction_for(instruction, task)
        batched = isinstance(audio, list) or isinstance(instruction, list)
        audios = audio if isinstance(audio, list) else [audio]
        if isinstance(instruction, list):
            instructions = instruction
            if not isinstance(audio, list):
                audios = [audio] * len(instructions)
        else:
            instructions = [instruction] * len(audios)
        if len(audios) != len(instructions):
            raise BlspError(f"{len(audios)} audio inputs but {len(instructions)} instructions")
        convs = [self.conversation(a, i, sampling_rate) for a, i in zip(audios, instructions, strict=True)]
        results = self.generate(convs, batch_size=batch_size, streamer=streamer, **gen)
        out = results if return_result else [r.text for r in results]
        return out if batched else out[0]

    def chat(
        self,
        conversation: Sequence[dict[str, Any]],
        *,
        streamer: Any = None,
        return_result: bool = False,
        **gen: Any,
    ) -> Any:
        """The assistant's next message for a conversation (text and audio parts, any number of turns)."""
        result = self.generate([conversation], streamer=streamer, **gen)[0]
        return result if return_result else result.text

    def generate(
        self,
        conversations: Sequence[Sequence[dict[str, Any]]],
        *,
        batch_size: int = 8,
        streamer: Any = None,
        **gen: Any,
    ) -> list[GenerationResult]:
        """Generate for many conversations, ``batch_size`` at a time."""
        params = self.params(**gen)
        if streamer is not None and len(conversations) != 1:
            raise BlspError("a streamer follows one conversation at a time")
        results: list[GenerationResult] = []
        for start in range(0, len(conversations), max(1, batch_size)):
            chunk = conversations[start : start + batch_size]
            prepared = [self.prepare(c, source=f"conversation {start + k}") for k, c in enumerate(chunk)]
            for ex in prepared:
                check_fits(self.model, ex, params.max_new_tokens)
            results += generate(self.model, prepared, params, streamer=streamer)
        return results

    def generate_mixed(
        self, conversations: Sequence[Sequence[dict[str, Any]]], params: Sequence[GenerationParams]
    ) -> list[GenerationResult]:
        """Generate with per-conversation settings (rows are grouped by sampling settings)."""
        prepared = [self.prepare(c, source=f"conversation {k}") for k, c in enumerate(conversations)]
        return generate_grouped(self.model, prepared, list(params))

    def stream(
        self,
        audio: Any = None,
        instruction: str | None = None,
        *,
        conversation: Sequence[dict[str, Any]] | None = None,
        task: str | None = None,
        sampling_rate: int | None = None,
        **gen: Any,
    ) -> Iterator[str]:
        """Yield the answer in pieces as it is generated; their concatenation is the full answer.

        Stopping the iteration early (``break``) stops the generation.
        """
        if conversation is None:
            conversation = self.conversation(audio, self.instruction_for(instruction, task), sampling_rate)
        params = self.params(**gen)
        example = self.prepare(conversation)
        check_fits(self.model, example, params.max_new_tokens)
        return stream_in_thread(
            lambda sink, cancel: generate(self.model, [example], params, sinks=[sink], cancels=[cancel])[0]
        )

    def start_chat(self, system: str | None = None, **kwargs: Any) -> Any:
        """A multi-turn ``ChatSession`` that keeps the KV cache between turns."""
        from blsp.inference.chat import ChatSession

        return ChatSession(self, system=system, **kwargs)


def stream_in_thread(run: Any) -> Iterator[str]:
    """Run ``run(sink, cancel)`` in a thread and yield what it sinks; re-raise its error."""
    q: queue.Queue = queue.Queue()
    cancel = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = run(q.put, cancel)
        except BaseException as e:  # handed to the consumer
            box["error"] = e
        finally:
            q.put(_DONE)

    def gen() -> Iterator[str]:
        thread = threading.Thread(target=target, name="blsp-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    break
                yield item
            if "error" in box:
                raise box["error"]
        finally:
            cancel.set()
            thread.join(timeout=60)

    return gen()
