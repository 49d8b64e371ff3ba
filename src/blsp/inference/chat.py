"""Multi-turn speech/text chat that keeps the LLM's KV cache between turns.

Each turn renders the whole conversation again (so the prompt is exactly what a fresh
``generate`` would see), then compares it position by position with what the cache holds: the
longest common prefix is kept (a speech position is identified by its clip's hash and offset,
a text position by its token id), only the rest is run through the LLM, and ``generate``
continues from the cache. Greedy answers therefore equal recomputing from scratch (tested),
while a new turn costs only its own tokens. When the conversation no longer fits the context
window, the oldest turns are dropped (the system message stays) and the cache is rebuilt.

``run_terminal_chat`` is the ``blsp chat`` loop: a line of text is a text turn, ``/audio PATH
[instruction]`` a speech turn, ``/mic [SECONDS] [instruction]`` records one where the optional
``sounddevice`` package and a microphone exist.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from blsp.data.audio import SAMPLE_RATE
from blsp.errors import BlspError
from blsp.inference.audio_input import AudioLimits, as_waveform
from blsp.inference.generate import context_window, prepare_conversation
from blsp.models.generation_blsp import (
    GenerationParams,
    GenerationResult,
    cache_kwargs,
    decode,
    model_pad_token_id,
    new_cache,
)

logger = logging.getLogger(__name__)


class ChatSession:
    """A conversation with a BLSP model, its KV cache kept across turns.

    Args:
        pipeline: a ``SpeechPipeline`` (its model, audio limits and default settings), or a
            ``BlspModel`` (no audio limits, greedy, 128 new tokens: a ``SpeechPipeline``'s defaults).
        system: optional system message.
        max_context: positions the conversation may take (default: the LLM's context window).
        use_cache: keep the KV cache between turns (False: recompute each turn, for comparison).
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        system: str | None = None,
        max_context: int | None = None,
        use_cache: bool = True,
    ) -> None:
        is_pipeline = hasattr(pipeline, "defaults") and hasattr(pipeline, "limits")
        self.model = pipeline.model if is_pipeline else pipeline
        self.limits: AudioLimits = pipeline.limits if is_pipeline else AudioLimits()
        self.defaults: GenerationParams = (
            pipeline.defaults if is_pipeline else GenerationParams(max_new_tokens=128)
        )
        self.system = system
        self.max_context = max_context or context_window(self.model)
        self.use_cache = use_cache
        self.history: list[dict[str, Any]] = []  # prepared messages (audio as log-mel + key)
        self._cache: Any = None
        self._cache_keys: list[Any] = []
        self._speech: dict[str, Any] = {}  # clip key -> adapter output [n, llm_dim]
        self.last_reused = 0  # positions taken from the cache in the last turn
        self.last_computed = 0  # positions run through the LLM before generating
        self.dropped_turns = 0

    # ------------------------------------------------------------------ public
    def reset(self) -> None:
        """Forget the conversation and the cache."""
        self.history.clear()
        self._cache, self._cache_keys = None, []
        self._speech.clear()

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as the model sees it (system message first when set)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def send(
        self,
        content: str | Sequence[dict[str, Any]],
        *,
        sink: Callable[[str], None] | None = None,
        streamer: Any = None,
        **gen: Any,
    ) -> GenerationResult:
        """Add a user turn (text, or a list of text/audio parts), generate and keep the answer.

        ``sink`` receives the answer in pieces as it is generated; ``streamer`` may instead be any
        ``transformers`` streamer. ``gen``: ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``.
        """
        params = self.defaults.updated(**gen)
        user = prepare_conversation(
            self.model, [{"role": "user", "content": content}], limits=self.limits, source="turn"
        ).conversation[0]
        conv = self._fit([*self.history, user], params.max_new_tokens)
        try:
            result = self._generate(conv, params, sink, streamer)
        except BaseException:  # interrupted mid-way: the cache may no longer match its keys
            self._cache, self._cache_keys = None, []
            raise
        self.history = [*conv[1 if self.system else 0 :], {"role": "assistant", "content": result.text}]
        return result

    def say(self, text: str, **gen: Any) -> str:
        return self.send(text, **gen).text

    def hear(
        self, audio: Any, instruction: str | None = None, sampling_rate: int | None = None, **gen: Any
    ) -> str:
        """A speech turn: the instruction (if any) then the audio."""
        parts: list[dict[str, Any]] = [{"type": "text", "text": instruction}] if instruction else []
        part = {"type": "audio", "audio": audio}
        if sampling_rate:
            part["sampling_rate"] = sampling_rate
        return self.send([*parts, part], **gen).text

    # ------------------------------------------------------------------ layout
    def _length(self, conv: list[dict[str, Any]]) -> int:
        return len(self._layout(conv)[0])

    def _layout(self, conv: list[dict[str, Any]]) -> tuple[list[Any], list[tuple[int, str, Any]]]:
        """Per-position keys of the prompt, and the audio spans as ``(start, key, features)``."""
        from blsp.models.prompt import AudioSpan

        keyof = {
            id(p["audio"]): p["key"]
            for m in conv
            if isinstance(m["content"], list)
            for p in m["content"]
            if p.get("type") == "audio"
        }
        keys: list[Any] = []
        spans: list[tuple[int, str, Any]] = []
        for seg in self.model.prompt.build(conv, add_generation_prompt=True).segments:
            if isinstance(seg, AudioSpan):
                key = keyof[id(seg.audio)]
                n = self.model.speech_length(seg.audio.shape[-1])
                spans.append((len(keys), key, seg.audio))
                keys += [("speech", key, j) for j in range(n)]
            else:
                keys += list(seg)
        return keys, spans

    def _fit(self, history: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
        """System + history, the oldest turns dropped until it fits with ``max_new_tokens``."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        conv = head + history
        while self._length(conv) + max_new_tokens > self.max_context:
            body = conv[len(head) :]
            # A turn is a user message and the replies up to the next user message.
            nxt = next((k for k in range(1, len(body)) if body[k]["role"] == "user"), None)
            if nxt is None:
                raise BlspError(
                    f"this turn alone takes {self._length(conv)} positions; with max_new_tokens="
                    f"{max_new_tokens} it does not fit the context window of {self.max_context}"
                )
            conv = head + body[nxt:]
            self.dropped_turns += 1
        return conv

    # ------------------------------------------------------------------ generation
    def _cropable(self) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self._cache, "layers", None)
        return layers is not None and all(type(layer) is DynamicLayer for layer in layers)

    def _speech_embeddings(self, key: str, feats: Any) -> Any:
        import torch

        if key not in self._speech:
            emb, lengths = self.model.speech_embeddings(feats[None], torch.tensor([feats.shape[-1]]))
            self._speech[key] = emb[0, : int(lengths[0])]
        return self._speech[key]

    def _generate(
        self,
        conv: list[dict[str, Any]],
        params: GenerationParams,
        sink: Callable[[str], None] | None,
        streamer: Any,
    ) -> GenerationResult:
        import torch

        model, llm = self.model, self.model.llm
        keys, spans = self._layout(conv)
        total = len(keys)
        # Reuse the longest common prefix; at least the last (text) position is always recomputed.
        reuse = 0
        if self.use_cache and self._cache is not None:
            limit = min(len(self._cache_keys), total - 1, self._cache.get_seq_length())
            while reuse < limit and self._cache_keys[reuse] == keys[reuse]:
                reuse += 1
            for start, _key, _f in spans:  # never split a speech span
                n = model.speech_length(_f.shape[-1])
                if start < reuse < start + n:
                    reuse = start
            held = self._cache.get_seq_length()
            if reuse < held and not self._cropable():
                reuse = 0
            if reuse == 0:
                self._cache = None
            elif reuse < held:
                self._cache.crop(reuse - held)
        if self._cache is None:
            self._cache = new_cache(llm)
            reuse = 0
        self.last_reused, self.last_computed = reuse, total - reuse

        # Positions reuse .. total-2 run here (the last one goes through generate()): their tokens,
        # with the adapter outputs of the clips that start there (never split: see above).
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([k if isinstance(k, int) else pad for k in keys], dtype=torch.long)
        device = model.device
        with torch.inference_mode():
            if total - 1 > reuse:
                part = slice(reuse, total - 1)
                speech_mask = torch.tensor([not isinstance(k, int) for k in keys[part]])
                clips = [self._speech_embeddings(k, f) for start, k, f in spans if reuse <= start < total - 1]
                embeds = model.embed(
                    ids[part][None], speech_mask[None], speech_embeds=torch.cat(clips) if clips else None
                )
                llm(
                    inputs_embeds=embeds,
                    attention_mask=torch.ones(1, total - 1, dtype=torch.long, device=device),
                    position_ids=torch.arange(reuse, total - 1, device=device)[None],
                    use_cache=True,
                    **cache_kwargs(llm, self._cache),
                )
        (result,) = decode(
            llm,
            model.tokenizer,
            model.prompt.stop_token_ids,
            [params],
            input_ids=ids[None].to(device),
            attention_mask=torch.ones(1, total, dtype=torch.long, device=device),
            cache=self._cache,
            prompt_tokens=[total],
            sinks=[sink] if sink is not None else None,
            streamer=streamer,
            pad_token_id=model_pad_token_id(model),
        )
        # The cache now holds the prompt and every answer token but the last one generated.
        held = self._cache.get_seq_length()
        self._cache_keys = (keys + result.token_ids)[:held]
        if not self.use_cache:
            self._cache, self._cache_keys = None, []
        # Forget speech embeddings of clips no longer in the conversation.
        live = {k for _s, k, _f in spans}
        for k in list(self._speech):
            if k not in live:
                del self._speech[k]
        return result


# ---------------------------------------------------------------------------- terminal loop
HELP = """Type a message and press Enter. Commands:
  /audio PATH [instruction]    a speech turn from an audio file (instruction optional)
  /mic [SECONDS] [instruction] record a speech turn from the microphone (needs `sounddevice`)
  /reset                       start a new conversation
  /history                     show the conversation
  /help                        this text
  /quit                        leave (Ctrl-D too)"""


def _sounddevice() -> Any:
    try:
        import sounddevice as sd  # optional dependency
    except Exception as e:  # ImportError, or OSError when PortAudio is missing
        raise BlspError(f"microphone input needs the 'sounddevice' package and PortAudio ({e})") from e
    return sd


def record_microphone(seconds: float, sr: int = SAMPLE_RATE) -> Any:
    """Record ``seconds`` of mono audio; ``BlspError`` when no sound device can be used."""
    sd = _sounddevice()
    try:
        sd.check_input_settings(samplerate=sr, channels=1)
        audio = sd.rec(int(seconds * sr), samplerate=sr, channels=1, dtype="float32")
        sd.wait()
    except Exception as e:
        raise BlspError(f"no usable microphone ({e})") from e
    return audio[:, 0]


def _parse_audio_command(rest: str) -> tuple[str, str | None]:
    rest = rest.strip()
    if not rest:
        raise BlspError("usage: /audio PATH [instruction]")
    try:
        first = shlex.split(rest)[0]
    except ValueError:
        first = rest.split()[0]
    if rest.startswith(("'", '"')):
        quote = rest[0]
        end = rest.find(quote, 1)
        remainder = rest[end + 1 :] if end > 0 else ""
    else:
        remainder = rest[len(rest.split()[0]) :]
    return first, remainder.strip() or None


def run_terminal_chat(
    session: ChatSession,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stream: bool = True,
    mic_seconds: float = 5.0,
    **gen: Any,
) -> int:
    """Read turns from ``stdin`` until EOF or ``/quit``; print answers (streamed) to ``stdout``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    if interactive:
        say("blsp chat: " + HELP.splitlines()[0] + " /help for commands.")
    turns = errors = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        cmd, _, rest = line.strip().partition(" ")
        try:
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/help":
                say(HELP)
                continue
            if cmd == "/reset":
                session.reset()
                say("(conversation reset)")
                continue
            if cmd == "/history":
                for m in session.messages():
                    say(f"{m['role']}: {_describe(m['content'])}")
                continue
            if cmd == "/audio":
                path, instruction = _parse_audio_command(rest)
                audio = as_waveform(path, limits=session.limits)  # fails here, before the answer
                parts = [{"type": "text", "text": instruction}] if instruction else []
                content: Any = [*parts, {"type": "audio", "audio": audio}]
            elif cmd == "/mic":
                words = rest.split(maxsplit=1)
                seconds = mic_seconds
                if words and _is_number(words[0]):
                    seconds, words = float(words[0]), words[1:]
                instruction = words[0] if words else None
                _sounddevice()
                say(f"(recording {seconds:g} s ...)")
                audio = record_microphone(seconds)
                parts = [{"type": "text", "text": instruction}] if instruction else []
                content = [*parts, {"type": "audio", "audio": audio}]
            elif cmd.startswith("/") and " " not in cmd and cmd[1:].isalpha():
                raise BlspError(f"unknown command {cmd}; /help lists them")
            else:
                content = line
            stdout.write("assistant> ")
            stdout.flush()
            if stream:
                result = session.send(content, sink=lambda t: (stdout.write(t), stdout.flush()), **gen)
                say()
            else:
                result = session.send(content, **gen)
                say(result.text)
            turns += 1
            logger.debug(
                "turn %d: reused %d positions, computed %d", turns, session.last_reused, session.last_computed
            )
        except BlspError as e:
            errors += 1
            say(f"error: {e}")
    return 0


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _describe(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    for p in content:
        if p.get("type") == "audio":
            out.append(f"[audio {p['audio'].shape[-1] / 100:.1f} s]")
        else:
            out.append(p.get("text", ""))
    return " ".join(out)
