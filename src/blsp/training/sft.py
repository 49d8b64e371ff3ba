"""Stage 1 (paper 4.1), optional: instruction-tune a base LLM on Alpaca-style JSON Lines.

Lines hold ``instruction``, optional ``input`` (joined to the instruction, as the paper does) and
``output``. The prompt is the paper's ``###[Human]:...\\n\\n\\n###[Assistant]:`` format (or the
tokenizer's own chat template); the loss covers the response and its end token. All weights or
LoRA adapters are trained. The result is an ordinary Hugging Face folder (LoRA merged) whose
tokenizer carries the training format as its chat template, so it serves as ``model.llm``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blsp.training.data import Example
from blsp.training.objectives import IGNORE_INDEX, response_logits

log = logging.getLogger(__name__)


def paper_chat_template(tokenizer: Any) -> str:
    """A Jinja chat template rendering the paper's format exactly as ``PromptBuilder`` does."""
    adds_bos = bool(tokenizer("", add_special_tokens=True)["input_ids"])
    head = "{{ bos_token }}" if adds_bos and tokenizer.bos_token else ""
    return (
        head + "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '###[Human]:' + message['content'] + '\\n\\n\\n' }}"
        "{% else %}{{ '###[Assistant]:' + message['content'] + eos_token + '\\n\\n\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '###[Assistant]:' }}{% endif %}"
    )


class SftCollator:
    """Alpaca examples -> right-padded ``input_ids``/``labels`` (labels on the response only)."""

    def __init__(self, tokenizer: Any, template: str, max_length: int = 1024) -> None:
        from blsp.models.prompt import PromptBuilder

        self.tokenizer = tokenizer
        self.prompt = PromptBuilder(tokenizer, template=template)
        self.max_length = max_length

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        rows = []
        for ex in examples:
            conv = [{"role": "user", "content": ex.instruction}]
            ids = self.prompt.text_prompt(conv)
            target = self.prompt.response_ids(ex.response)
            seq = (ids + target)[: self.max_length]
            lab = ([IGNORE_INDEX] * len(ids) + target)[: self.max_length]
            rows.append((seq, lab))
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.prompt.end_token_id
        )
        length = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (seq, lab) in enumerate(rows):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(seq)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels,
        }
        count = int((labels[:, 1:] != IGNORE_INDEX).sum())
        return {"ids": [e.id for e in examples], "skipped": [], "count": count, "student": batch}


class SftLoss(nn.Module):
    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.llm.parameters()).device
        batch = {k: v.to(device) for k, v in student.items()}
        logits, targets = response_logits(self.llm, batch, use_cache=False)
        ce = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        return {
            "loss_sum": ce,
            "count": torch.tensor(targets.numel(), device=ce.device),
            "ce_sum": ce.detach(),
        }


def save_llm_folder(llm: nn.Module, tokenizer: Any, path: Path, chat_template: str | None) -> None:
    """An ordinary HF folder (config, safetensors weights, tokenizer) that ``load_llm`` accepts."""
    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    cfg = llm.config.to_dict()
    quantized = (
        cfg.pop("quantization_config", None) is not None
    )  # GGUF-loaded: plain weights once dequantised
    try:
        llm.save_pretrained(str(path), safe_serialization=True)
    except Exception as e:  # e.g. "quantized with gguf and is not serializable"
        log.info("save_pretrained refused (%s); writing the state dict directly", e)
        save_model(llm, str(path / "model.safetensors"), metadata={"format": "pt"})
        quantized = True
    if quantized:
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(path))
