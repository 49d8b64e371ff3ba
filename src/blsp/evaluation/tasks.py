"""Evaluation tasks: the instruction a system is given, the reference an answer is scored against.

A task spec is ``NAME[@TESTSET]`` (the test set is resolved by :mod:`blsp.evaluation.testsets`):

==================  =======  ==========================================================  ==========================
name                kind     instruction (paper Table 11 unless noted)                   scored by
==================  =======  ==========================================================  ==========================
``asr``             asr      ``task_instruction("asr")`` (repeat the words)               WER (CER for zh) vs ``text``
``st:de``           st       ``task_instruction("st:German")``                             BLEU + chrF vs item ``de``
``x2en:zh``         st       the ST instruction with the source language named (Table 5)   BLEU + chrF vs item ``en``
``intent``          classify Table 11 SNIPS form with the test set's intent labels         accuracy, out-of-set rate
``snips`` / ``fsc`` classify ``task_instruction("snips"|"fsc")``                           accuracy, out-of-set rate
``sentiment``       classify ``task_instruction("sentiment")`` (positive/negative/neutral)  accuracy, out-of-set rate
``coffee``          classify which drink a spoken coffee order names (Picovoice)           accuracy, out-of-set rate
``qa``              qa       the item's ``question`` (appendix C)                          LLM-judged accept rate
``align[:B]``       align    behavior B's instruction (continuation by default, Table 1)   speech vs text path
                             or another task's (``align:x2en:zh``: no reference needed)
``content``         content  the repetition behavior (Table 1), teacher-forced on ``text``  loss with own vs other speech
==================  =======  ==========================================================  ==========================

``content`` generates nothing: it measures whether the model's answers depend on the speech at all
(see :func:`blsp.evaluation.runner.content_rows` and :func:`blsp.evaluation.scoring.score_content`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from blsp.errors import BlspError
from blsp.instructions import BEHAVIORS, REPETITION, TASK_INSTRUCTIONS, task_instruction

LANGUAGE_NAMES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "zh": "Chinese",
    "es": "Spanish",
    "it": "Italian",
    "nl": "Dutch",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "ca": "Catalan",
    "id": "Indonesian",
    "sl": "Slovenian",
    "sv": "Swedish",
    "ja": "Japanese",
}
_NAME_TO_CODE = {v.lower(): k for k, v in LANGUAGE_NAMES.items()} | {"mandarin": "zh"}

SENTIMENT_LABELS = ("positive", "negative", "neutral")
INTENT_TEMPLATE = "Please classify the intent of the text, choose from [{labels}]."
COFFEE_TEMPLATE = "Please classify the drink ordered in the text, choose from [{labels}]."

KINDS = ("asr", "st", "classify", "qa", "align", "content")
#: Kinds whose systems generate an answer per item (``content`` only scores given targets).
GENERATION_KINDS = ("asr", "st", "classify", "qa", "align")


def lang_code(lang: str) -> str:
    """``de`` or ``German`` -> ``de``."""
    low = lang.strip().lower()
    if low in LANGUAGE_NAMES:
        return low
    if low in _NAME_TO_CODE:
        return _NAME_TO_CODE[low]
    raise BlspError(f"unknown language {lang!r}; known: {', '.join(sorted(LANGUAGE_NAMES))}")


def translation_instruction(source: str | None, target: str) -> str:
    """Table 11's ST instruction, with the source language named (English in the paper), or with
    none when ``source`` is None (speech of an unstated language)."""
    template = TASK_INSTRUCTIONS["st"]
    src = LANGUAGE_NAMES[lang_code(source)] if source is not None else None
    if src != "English":
        template = template.replace("English ", f"{src} " if src else "", 1)
    return template.format(target=LANGUAGE_NAMES[lang_code(target)])


@dataclass
class Task:
    """One evaluation task bound to its test-set items."""

    name: str
    kind: str
    instruction: str | None  # None: per item (qa)
    items: list[dict[str, Any]] = field(default_factory=list)
    testset: str = ""
    labels: list[str] | None = None
    target_lang: str = "en"  # language of the reference text
    behavior: str | None = None  # align: which behavior's instruction

    @property
    def key(self) -> str:
        """Unique name of the task on its test set, used in result tables and file names."""
        return f"{self.name}@{self.testset}" if self.testset else self.name

    def instruction_for(self, item: dict[str, Any]) -> str:
        if self.instruction is not None:
            return self.instruction
        q = item.get("question")
        if not isinstance(q, str) or not q.strip():
            raise BlspError(f"item {item.get('id')!r}: a qa item needs a 'question' field")
        return q

    def reference(self, item: dict[str, Any]) -> str | None:
        """The reference the answer to ``item`` is scored against (None if the item has none)."""
        if self.kind in ("asr", "align", "content"):
            return item.get("text")
        if self.kind == "st":
            ref = item.get(self.target_lang)
            if ref is None:
                tr = item.get("translation")
                ref = tr.get(self.target_lang) if isinstance(tr, dict) else tr
            return ref
        if self.kind == "classify":
            return item.get("label", item.get("intent"))
        if self.kind == "qa":
            return item.get("answer")
        return None

    def source_lang(self, item: dict[str, Any]) -> str:
        return str(item.get("lang") or "en")

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "key": self.key,
            "name": self.name,
            "kind": self.kind,
            "testset": self.testset,
            "n": len(self.items),
            "instruction": self.instruction if self.instruction is not None else "(per item: question)",
            "target_lang": self.target_lang,
        }
        if self.labels:
            d["labels"] = list(self.labels)
        if self.behavior:
            d["behavior"] = self.behavior
        return d


def parse_task_spec(spec: str) -> tuple[str, str | None]:
    """``NAME[@TESTSET]`` -> ``(NAME, TESTSET or None)``."""
    name, sep, testset = spec.partition("@")
    name = name.strip()
    if not name:
        raise BlspError(f"task spec {spec!r}: empty task name (expected NAME[@TESTSET])")
    return name, (testset.strip() or None) if sep else None


def _labels_of(items: Sequence[dict[str, Any]], name: str) -> list[str]:
    labels = sorted(
        {str(it.get("label", it.get("intent"))) for it in items if it.get("label", it.get("intent"))}
    )
    if not labels:
        raise BlspError(f"task {name!r}: the test set has no 'label' or 'intent' fields")
    return labels


def make_task(name: str, items: Sequence[dict[str, Any]], testset: str = "") -> Task:
    """Build the task ``name`` (see the module table) over ``items``."""
    items = list(items)
    head, _, arg = name.partition(":")
    if head == "asr":
        langs = {str(it.get("lang") or "en") for it in items}
        return Task(
            name,
            "asr",
            task_instruction("asr"),
            items,
            testset,
            target_lang=langs.pop() if len(langs) == 1 else "en",
        )
    if head == "st":
        if not arg:
            raise BlspError("task 'st' needs a target language, e.g. st:de")
        tgt = lang_code(arg)
        return Task(f"st:{tgt}", "st", translation_instruction("en", tgt), items, testset, target_lang=tgt)
    if head == "x2en":
        if not arg:
            raise BlspError("task 'x2en' needs a source language, e.g. x2en:zh")
        src = lang_code(arg)
        return Task(f"x2en:{src}", "st", translation_instruction(src, "en"), items, testset, target_lang="en")
    if head in ("snips", "fsc"):
        from blsp.instructions import FSC_INTENTS, SNIPS_LIGHT_INTENTS

        labels = [s.strip() for s in (SNIPS_LIGHT_INTENTS if head == "snips" else FSC_INTENTS).split(",")]
        return Task(head, "classify", task_instruction(head), items, testset, labels=labels)
    if head == "intent":
        from blsp.instructions import SNIPS_LIGHT_INTENTS

        labels = _labels_of(items, name)
        snips = [s.strip() for s in SNIPS_LIGHT_INTENTS.split(",")]
        if set(labels) <= set(snips):  # the paper's SNIPS light intents: its exact instruction
            return Task("intent", "classify", task_instruction("snips"), items, testset, labels=snips)
        instr = INTENT_TEMPLATE.format(labels=", ".join(labels))
        return Task("intent", "classify", instr, items, testset, labels=labels)
    if head == "coffee":
        labels = _labels_of(items, name)
        return Task(
            "coffee",
            "classify",
            COFFEE_TEMPLATE.format(labels=", ".join(labels)),
            items,
            testset,
            labels=labels,
        )
    if head == "sentiment":
        return Task(
            "sentiment",
            "classify",
            task_instruction("sentiment"),
            items,
            testset,
            labels=list(SENTIMENT_LABELS),
        )
    if head == "qa":
        return Task("qa", "qa", None, items, testset)
    if head == "align":
        behavior = arg or "continuation"
        if behavior in BEHAVIORS:
            instruction = BEHAVIORS[behavior]
        else:  # another task's instruction, e.g. align:x2en:zh (speech/text agreement without references)
            if behavior.split(":", 1)[0] in ("align", "qa"):
                raise BlspError(f"task {name!r}: align needs a behavior or a task with one instruction")
            instruction = make_task(behavior, items, testset).instruction
        return Task(
            f"align:{behavior}" if arg else "align", "align", instruction, items, testset, behavior=behavior
        )
    if head == "content":
        # the repetition target is the transcript, so the loss is defined on every transcribed clip
        return Task("content", "content", REPETITION, items, testset, behavior="repetition")
    raise BlspError(
        f"unknown task {name!r}; known: asr, st:<lang>, x2en:<lang>, intent, snips, fsc, sentiment, coffee, qa, "
        "align[:behavior], content"
    )


# Primary metric of each kind for the overview table: (key, label, higher is better)
PRIMARY = {
    "asr": ("score", "WER", False),
    "st": ("bleu", "BLEU", True),
    "classify": ("accuracy", "Acc", True),
    "qa": ("accept_rate", "Accept", True),
    "align": ("chrf", "chrF s/t", True),
    "content": ("gap", "gap nats", True),
}
