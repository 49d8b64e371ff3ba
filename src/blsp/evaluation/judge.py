"""LLM judge of general-purpose QA answers with the paper's Listing 2 prompt (appendix C).

A judge is a local ``transformers`` causal LM (:class:`LocalJudge`) or any OpenAI-compatible
chat endpoint (:class:`OpenAIJudge`). A judge that cannot be reached raises
:class:`JudgeUnavailable`; the evaluation then reports the judge as down instead of scoring 0.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol

from blsp.errors import BlspError

log = logging.getLogger(__name__)

# Listing 2, verbatim.
JUDGE_PROMPT = (
    "Given a question, related input, and answer, please help determine whether the\n"
    "answer is acceptable.\n"
    "The output choose from acceptable or unacceptable.\n"
    "Question: ${question}\n"
    "Input: ${transcript}\n"
    "Answer: ${answer}\n"
    "Your output:"
)


class JudgeUnavailable(BlspError):
    """The judge cannot be reached or loaded; its verdicts are missing, not negative."""


def judge_prompt(question: str, transcript: str, answer: str) -> str:
    """Listing 2 filled in."""
    return (
        JUDGE_PROMPT.replace("${question}", question)
        .replace("${transcript}", transcript)
        .replace("${answer}", answer)
    )


_VERDICT = re.compile(r"\b(unacceptable|not acceptable|acceptable)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """``True`` for acceptable, ``False`` for unacceptable, ``None`` when the judge said neither."""
    m = _VERDICT.search(text or "")
    if not m:
        return None
    return m.group(1).lower() == "acceptable"


class Judge(Protocol):
    name: str

    def judge(self, question: str, transcript: str, answer: str) -> tuple[bool | None, str]:
        """Return ``(verdict, raw judge output)``; raise :class:`JudgeUnavailable` if down."""
        ...


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp, ...)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_tokens: int = 8,
    ) -> None:
        import openai

        self.name = f"openai:{model}@{base_url}"
        self.model = model
        self.max_tokens = max_tokens
        self._openai = openai
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=1
        )

    def judge(self, question: str, transcript: str, answer: str) -> tuple[bool | None, str]:
        o = self._openai
        try:
            r = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": judge_prompt(question, transcript, answer)}],
                max_tokens=self.max_tokens,
                temperature=0.0,
            )
        except (o.APIConnectionError, o.APITimeoutError, o.AuthenticationError, o.NotFoundError) as e:
            raise JudgeUnavailable(f"judge {self.name} unavailable: {type(e).__name__}: {e}") from e
        except o.APIStatusError as e:
            if e.status_code >= 500 or e.status_code in (401, 403, 404):
                raise JudgeUnavailable(f"judge {self.name} unavailable: HTTP {e.status_code}") from e
            raise
        text = (r.choices[0].message.content or "") if r.choices else ""
        return parse_verdict(text), text


class LocalJudge:
    """A local causal LM judge (any ``blsp.models.hub`` reference or Hugging Face folder), greedy."""

    def __init__(self, ref: str, device: str | None = None, max_new_tokens: int = 8) -> None:
        self.name = f"local:{ref}"
        self.ref = ref
        self.device = device
        self.max_new_tokens = max_new_tokens
        self._model: Any = None
        self._tok: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            from blsp.models.hub import load_llm

            model, tok = load_llm(self.ref)
        except ImportError:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model, tok = (
                AutoModelForCausalLM.from_pretrained(self.ref),
                AutoTokenizer.from_pretrained(self.ref),
            )
        except BlspError as e:
            raise JudgeUnavailable(f"judge {self.name} cannot be loaded: {e}") from e
        if self.device:
            model = model.to(self.device)
        self._model, self._tok = model.eval(), tok

    def judge(self, question: str, transcript: str, answer: str) -> tuple[bool | None, str]:
        import torch

        self._load()
        tok, model = self._tok, self._model
        prompt = judge_prompt(question, transcript, answer)
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return parse_verdict(text), text


def make_judge(spec: str | None, api_key: str | None = None) -> Judge | None:
    """Build a judge from ``spec``: ``openai:MODEL@BASE_URL``, ``http(s)://BASE_URL#MODEL`` or a local LLM reference."""
    if not spec:
        return None
    if spec.startswith("openai:"):
        model, sep, url = spec[len("openai:") :].partition("@")
        if not sep or not model or not url:
            raise BlspError(f"judge {spec!r}: expected openai:MODEL@BASE_URL")
        return OpenAIJudge(url, model, api_key=api_key)
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return OpenAIJudge(url, model or "default", api_key=api_key)
    return LocalJudge(spec)
