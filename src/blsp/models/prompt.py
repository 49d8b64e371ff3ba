"""Prompt building shared by every path: behaviors (step 1), training (step 2), inference.

A conversation is a list of messages ``{"role", "content"}``; ``content`` is a string or a list
of parts: ``{"type": "text"}`` (rendered into the template), ``{"type": "audio", "audio": array}``
(replaced by speech embeddings) or ``{"type": "transcript", "text": ...}`` (the text path of a
speech span). Speech and transcript spans are tokenized on their own, between the template's
pieces, so the text path and the speech path are the same token sequence but for that span.

The LLM's own chat template is used when it has one; otherwise (or with ``template="paper"``)
the paper's ``###[Human]:<instruction><speech>\\n\\n\\n###[Assistant]:`` format.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from blsp.errors import BlspError

# Private-use code points: cannot collide with text a user or template writes.
_SPAN = "\ue000blsp-span\ue001"
_RESPONSE = "\ue000blsp-response\ue001"

Conversation = list[dict[str, Any]]


#: the roles a conversation's messages may have
ROLES = ("system", "user", "assistant")


def check_role(role: Any, where: str) -> str:
    """``role`` when a conversation message may have it; else a BlspError naming ``where``."""
    if role not in ROLES:
        raise BlspError(f"{where}: role must be system, user or assistant, not {role!r}")
    return role


def make_conversation(instruction: str, *, audio: Any = None, transcript: str | None = None) -> Conversation:
    """One user turn: the instruction, then the speech span (``audio``) or its ``transcript``."""
    if (audio is None) == (transcript is None):
        raise BlspError("make_conversation needs exactly one of audio= or transcript=")
    span = (
        {"type": "audio", "audio": audio} if audio is not None else {"type": "transcript", "text": transcript}
    )
    parts = [{"type": "text", "text": instruction}] if instruction else []
    return [{"role": "user", "content": [*parts, span]}]


MIN_SHARED_PREFIX = 8  # shorter shared heads are not worth a separate forward pass


def shared_prefix_length(prompts: Any) -> int:
    """Length of the token prefix every prompt shares, leaving each prompt at least one own token."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(n, 0)


@dataclass
class AudioSpan:
    """Where speech embeddings go in a prompt; ``audio`` is an array or a path."""

    audio: Any


@dataclass
class Prompt:
    """A prompt as segments: token-id lists and audio spans, in order."""

    segments: list[list[int] | AudioSpan] = field(default_factory=list)

    @property
    def audios(self) -> list[Any]:
        return [s.audio for s in self.segments if isinstance(s, AudioSpan)]

    def token_ids(self) -> list[int]:
        """All token ids; only valid for a prompt without audio."""
        if self.audios:
            raise BlspError("this prompt has audio spans; it has no text-only token sequence")
        return [t for s in self.segments for t in s]  # type: ignore[union-attr]


def prompt_fingerprint(ids: Sequence[int]) -> str:
    """Short stable hash of prompt token ids (a behavior line's ``prompt_sha1``)."""
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


class PromptBuilder:
    """Turns conversations into token segments with one tokenizer and one template."""

    @classmethod
    def from_config(cls, tokenizer: Any, config: Any) -> PromptBuilder:
        """The builder of a ``BlspConfig``'s prompt fields: the one ``BlspModel(config)`` uses."""
        return cls(
            tokenizer,
            template=config.prompt_template,
            instruction_separator=config.instruction_separator,
            system_prompt=config.system_prompt,
        )

    def __init__(
        self,
        tokenizer: Any,
        template: str = "auto",
        instruction_separator: str = "\n",
        system_prompt: str | None = None,
    ) -> None:
        if template not in ("auto", "chat", "paper"):
            raise BlspError(f"prompt_template must be auto, chat or paper, not {template!r}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise BlspError("prompt_template='chat' but the LLM's tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.use_chat = has_chat and template != "paper"
        self.separator = instruction_separator
        self.system_prompt = system_prompt
        self._encode = lru_cache(maxsize=4096)(self._encode_uncached)
        self._bos = self._leading_special_tokens()
        self.end_token_id = self._find_end_token()
        eos = tokenizer.eos_token_id
        self.stop_token_ids = sorted({self.end_token_id, *([eos] if eos is not None else [])})

    # ------------------------------------------------------------------ render
    def _content_text(self, content: Any, spans: list[dict[str, Any]]) -> str:
        if isinstance(content, str):
            return content
        pieces = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                pieces.append(part["text"])
            elif kind in ("audio", "transcript"):
                pieces.append(_SPAN)
                spans.append(part)
            else:
                raise BlspError(f"unknown content part type {kind!r} (expected text, audio or transcript)")
        return self.separator.join(p for p in pieces if p != "")

    def _render(self, conversation: Conversation, add_generation_prompt: bool) -> tuple[str, list[dict]]:
        spans: list[dict[str, Any]] = []
        messages = []
        if self.system_prompt and not any(m.get("role") == "system" for m in conversation):
            messages.append({"role": "system", "content": self.system_prompt})
        for i, m in enumerate(conversation):
            role = check_role(m.get("role"), f"message {i}")
            messages.append({"role": role, "content": self._content_text(m.get("content", ""), spans)})
        if self.use_chat:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        else:
            text = self._render_paper(messages, add_generation_prompt)
        return text, spans

    def _render_paper(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        out = []
        eos = self.tokenizer.eos_token or ""
        for m in messages:
            if m["role"] == "system":
                out.append(m["content"] + "\n\n\n")
            elif m["role"] == "user":
                out.append("###[Human]:" + m["content"] + "\n\n\n")
            else:
                out.append("###[Assistant]:" + m["content"] + eos + "\n\n\n")
        if add_generation_prompt:
            out.append("###[Assistant]:")
        return "".join(out)

    # ---------------------------------------------------------------- tokenize
    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _leading_special_tokens(self) -> list[int]:
        if self.use_chat:
            return []  # chat templates write their own BOS text
        ids = self.tokenizer("", add_special_tokens=True)["input_ids"]
        return list(ids)

    def _find_end_token(self) -> int:
        """The token that ends an assistant turn (``<|im_end|>``, ``<|eot_id|>``, or EOS)."""
        if not self.use_chat:
            if self.tokenizer.eos_token_id is None:
                raise BlspError("the LLM's tokenizer has no EOS token to end a response with")
            return int(self.tokenizer.eos_token_id)
        conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _RESPONSE}]
        full = self.tokenizer.apply_chat_template(conv, tokenize=False)
        after = full.split(_RESPONSE, 1)[1]
        ids = self._encode(after)
        if not ids:
            return int(self.tokenizer.eos_token_id)
        return int(ids[0])

    def build(self, conversation: Conversation, add_generation_prompt: bool = True) -> Prompt:
        """Segments for ``conversation`` (ending with the assistant's generation prompt)."""
        text, spans = self._render(conversation, add_generation_prompt)
        chunks = text.split(_SPAN)
        if len(chunks) != len(spans) + 1:
            raise BlspError(
                "the chat template dropped or repeated a speech span; use prompt_template='paper'"
            )
        prompt = Prompt([list(self._bos)] if self._bos else [])
        for i, chunk in enumerate(chunks):
            if chunk:
                prompt.segments.append(list(self._encode(chunk)))
            if i < len(spans):
                span = spans[i]
                if span["type"] == "audio":
                    prompt.segments.append(AudioSpan(span["audio"]))
                else:
                    prompt.segments.append(list(self._encode(span["text"])))
        return prompt

    def response_ids(self, response: str) -> list[int]:
        """Target ids of a response: its tokens then the end-of-turn token."""
        return [*self._encode(response), self.end_token_id]

    # -------------------------------------------------------------- text path
    def text_prompt(self, conversation: Conversation) -> list[int]:
        """Token ids that the LLM sees on the text path (step 1 of BLSP)."""
        return self.build(conversation).token_ids()

    def render_text(self, conversation: Conversation) -> str:
        """The text-path prompt as a string (for backends that take text)."""
        return self.tokenizer.decode(self.text_prompt(conversation), skip_special_tokens=False)
