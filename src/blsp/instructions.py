"""The paper's instructions, verbatim: behaviors (Table 1), analysis (Table 6), tasks (Table 11).

``ASR_INSTRUCTIONS`` holds about 100 varied transcription instructions for the ASR-pretraining
baseline (paper appendix A), kept in ``resources/asr_instructions.txt``.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from blsp.errors import BlspError

# Table 1: behaviors.
CONTINUATION = "Continue the following text in a coherent and engaging style with less than 40 words."
REPETITION = "Please repeat the following words."

BEHAVIORS = {"continuation": CONTINUATION, "repetition": REPETITION}

# Table 6: instructions for extracting cross-modal representations.
TABLE6 = {
    "CW": "Please continue the following sentence.",
    "SA": "Please classify the emotional tone of the following text.",
    "SR": "Please transcribe the following audio into English text.",
    "ST": "Please translate the following English text into German text.",
}

SNIPS_LIGHT_INTENTS = (
    "DecreaseBrightness, IncreaseBrightness, SetLightBrightness, SetLightColor, SwitchLightOff, SwitchLightOn"
)
FSC_INTENTS = (
    "bring newspaper, deactivate lamp, change language English, deactivate music, increase heat, "
    "change language Korean, change language none, bring shoes, change language German, activate lights, "
    "bring socks, change language Chinese, decrease heat, decrease volume, increase volume, activate music, "
    "activate lamp, bring juice"
)

# Table 11: instructions for speech-to-text tasks. ``st:<Language>`` fills the target language.
TASK_INSTRUCTIONS = {
    "asr": "Please repeat the following words.",
    "st": "Please translate the following English text into {target} text.",
    "snips": f"Please classify the intent of the text, choose from [{SNIPS_LIGHT_INTENTS}].",
    "fsc": f"Please classify the intent of the text, choose from [{FSC_INTENTS}].",
    "sentiment": "Please classify the emotional tone of the text as either positive, negative, or neutral.",
}


def task_instruction(name: str) -> str:
    """Instruction for a Table 11 task name: ``asr``, ``st:German``, ``snips``, ``fsc``, ``sentiment``."""
    key, _, arg = name.partition(":")
    if key not in TASK_INSTRUCTIONS:
        raise BlspError(
            f"unknown task {name!r}; known: {', '.join(sorted(TASK_INSTRUCTIONS))} (st takes st:<Language>)"
        )
    if key == "st":
        if not arg:
            raise BlspError("task 'st' needs a target language, e.g. st:German")
        return TASK_INSTRUCTIONS["st"].format(target=arg)
    return TASK_INSTRUCTIONS[key]


@cache
def behavior_instructions() -> tuple[str, ...]:
    """The general instructions of diverse-instruction behaviors (``resources/behavior_instructions.txt``).

    None is an evaluation task's instruction, so transcription, translation, intent and sentiment
    stay zero-shot for an adapter trained on their answers.
    """
    return _resource_lines("behavior_instructions.txt")


@cache
def choice_instructions() -> tuple[str, ...]:
    """Label-choice instructions of diverse-instruction behaviors (``resources/choice_instructions.txt``).

    Each lists its labels in square brackets (:func:`choice_labels`); none shares a task or a
    label with an evaluation set.
    """
    return _resource_lines("choice_instructions.txt")


def choice_labels(instruction: str) -> tuple[str, ...]:
    """The labels listed in square brackets in ``instruction`` (empty if there is no list)."""
    found = re.search(r"\[([^\]]+)\]", instruction)
    return tuple(x.strip() for x in found.group(1).split(",")) if found else ()


@cache
def asr_instructions() -> tuple[str, ...]:
    """The ~100 ASR-pretraining instructions (one a line in the bundled resource)."""
    return _resource_lines("asr_instructions.txt")


def _resource_lines(name: str) -> tuple[str, ...]:
    text = resources.files("blsp.resources").joinpath(name).read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
