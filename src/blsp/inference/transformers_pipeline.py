"""``BlspPipeline``: the ``transformers.Pipeline`` face of ``SpeechPipeline`` (task ``"blsp"``).

``pipeline("blsp", model=FOLDER_OR_HUB_ID)`` after ``import blsp`` (see ``blsp.models.auto``).
Inputs: an audio path, bytes or array (``sampling_rate=`` for arrays), or a dict
``{"audio": ..., "instruction": ...}``; ``instruction=`` or ``task=`` (``asr``, ``st:German``,
...) as call arguments; the default instruction is the paper's ASR one. Outputs
``{"generated_text": ...}``.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from blsp.inference.pipeline import SpeechPipeline
from blsp.instructions import task_instruction

PIPELINE_TASK = "blsp"


class BlspPipeline(Pipeline):
    """Speech plus a text instruction in, the BLSP model's answer out."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        self.speech = SpeechPipeline(model)  # before super(): it sanitizes the call defaults
        kwargs.setdefault("tokenizer", model.tokenizer)
        super().__init__(model, *args, **kwargs)

    def _sanitize_parameters(
        self,
        instruction: str | None = None,
        task: str | None = None,
        sampling_rate: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        **_: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        pre: dict[str, Any] = {"sampling_rate": sampling_rate}
        if instruction is not None or task is not None:
            pre["instruction"] = SpeechPipeline.instruction_for(instruction, task)
        gen = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        return pre, {"params": self.speech.params(**gen)}, {}

    def preprocess(
        self, inputs: Any, instruction: str | None = None, sampling_rate: int | None = None
    ) -> dict[str, Any]:
        if isinstance(inputs, dict) and "audio" in inputs:
            instruction = inputs.get("instruction", instruction)
            sampling_rate = inputs.get("sampling_rate", sampling_rate)
            inputs = inputs["audio"]
        conv = SpeechPipeline.conversation(inputs, instruction or task_instruction("asr"), sampling_rate)
        return {"example": self.speech.prepare(conv)}

    def _forward(self, model_inputs: dict[str, Any], params: Any = None) -> dict[str, Any]:
        from blsp.inference.generate import check_fits
        from blsp.models.generation_blsp import generate

        params = params or self.speech.params()
        check_fits(self.model, model_inputs["example"], params.max_new_tokens)
        return {"result": generate(self.model, [model_inputs["example"]], params)[0]}

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, str]:
        return {"generated_text": model_outputs["result"].text}


# The "blsp" task, registered when this module is imported (``blsp.models.auto`` imports it once
# ``transformers.pipelines`` is imported; or this module comes first).
PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=BlspPipeline, pt_model=AutoModel)
