"""The demo's settings as data: presets, the systems and recipes it trains, its test sets and tasks."""

from __future__ import annotations

from typing import Any

DEFAULT_ENCODER, DEFAULT_LLM = "whisper-base", "smollm2-135m-instruct"

#: Presets as data. ``quick`` takes ~13 min on 2 idle cores, ``default`` ~38 min (measured); ``tiny``
#: makes every step minimal (tests).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sentences": 8,
        "voices": ["espeak:en-us"],
        "voices_per_text": 1,
        "ctc_steps": 2,
        "ctc_batch_size": 2,
        # the tiny random LLM's tokenizer gives more labels than the tiny encoder has frames: its
        # warm start is a CTC over the tokenizer's vocabulary with 3 labels a frame
        "ctc_sets": ["ctc.vocab=tokenizer", "ctc.upsample=3"],
        "train_steps": 2,
        "batch_size": 2,
        "micro_batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 0,
        "eval_items": 3,
        "repr_items": 3,
        "behavior_max_new_tokens": 24,
        # SmolLM2-135M echoes most sentences back; the tiny run keeps those (flagged) so that it
        # always has data, the real presets drop them as the behavior filter does by default.
        "echo": "flag",
        "eval_max_new_tokens": 16,
        "workers": 2,
    },
    "quick": {
        "sentences": 30,
        "voices": ["espeak:en-us", "flite:kal"],
        "voices_per_text": 2,
        "ctc_steps": 40,
        "ctc_batch_size": 16,
        "train_steps": 10,
        "batch_size": 8,
        "micro_batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 2,
        "eval_items": 4,
        "repr_items": 6,
        "behavior_max_new_tokens": 48,
        "echo": "drop",
        "eval_max_new_tokens": 32,
        "workers": 2,
    },
    "default": {
        "sentences": 600,
        "voices": ["piper:joe", "espeak:en-us", "flite:kal", "flite:awb", "espeak:en+m3"],
        "voices_per_text": 2,
        # the warm start the adapters need to use the speech within the hour (docs/RECIPES.md)
        "ctc_steps": 900,
        "ctc_batch_size": 32,
        "train_steps": 150,
        "batch_size": 8,
        "micro_batch_size": 8,
        "lr": 5e-4,
        "warmup_steps": 10,
        "eval_items": 32,  # 95 % intervals of about +-15 points on a rate; the run stays near 40 min
        "repr_items": 16,
        "behavior_max_new_tokens": 64,
        "echo": "drop",
        "eval_max_new_tokens": 48,
        "workers": 2,
    },
}

#: System name in eval outputs -> name in the report.
SYSTEMS: dict[str, str] = {
    "blsp": "BLSP",
    "blsp_rp": "BLSP+RP",
    "asr_pretrain": "ASR pretraining",
    "blsp_kl": "BLSP (KL)",
    "blsp_scratch": "BLSP from scratch (no warm start)",
    "text_llm": "Text+LLM",
    "whisper_llm": "Whisper+LLM",
    "shipped": "blsp-base (shipped, not trained by the demo)",
}
#: Training runs: run name -> shipped recipe (``blsp/recipes/NAME.yaml``). ``align_ctc`` is the warm
#: start every other recipe but ``blsp_scratch`` starts from.
RECIPES: dict[str, str] = {
    "align_ctc": "align_ctc",
    "blsp": "blsp",
    "blsp_rp": "blsp_rp",
    "asr_pretrain": "asr_pretrain",
    "blsp_kl": "blsp_kl",
    "blsp_scratch": "blsp",
}
#: The recipes that start from the warm start.
WARM = ("blsp", "blsp_rp", "asr_pretrain", "blsp_kl")
#: Preset settings that only the evaluation steps read (changing one reruns those steps only).
EVAL_PARAMS = frozenset({"eval_items", "repr_items", "eval_max_new_tokens"})
EVAL_STEPS = frozenset({"testsets", "eval", "repr"})
#: A gap (nats) above which the demo's adapters count as using the speech (issue 11).
USES_SPEECH_NATS = 0.3
TESTSETS = ("tts-asr-en", "tts-intent", "tts-sentiment")
EVAL_TASKS = (
    "asr@tts-asr-en",
    "intent@tts-intent",
    "sentiment@tts-sentiment",
    "align@tts-asr-en",
    "content@tts-asr-en",
)
