"""Downstream fine-tuning (paper 5.2, Table 4): LoRA on the LLM's attention plus encoder and adapter.

``apply_lora`` wraps ``model.llm`` in a ``peft`` model with LoRA (r=16, alpha=16 by default) on
q, k, v and o; the encoder and the adapter may be trained too. A fine-tuned model folder is the
adapter folder (``config.json`` + ``adapter.safetensors``) with ``lora/`` (a ``peft`` adapter
folder) and ``encoder.safetensors`` beside it; ``BlspModel.from_pretrained`` loads all three.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from blsp.errors import ModelLoadError
from blsp.models.hub import ENCODER_WEIGHTS, LORA_DIR
from blsp.training.config import LoraConfig

log = logging.getLogger(__name__)


def apply_lora(model: Any, cfg: LoraConfig) -> None:
    """Add LoRA to ``model.llm`` and make the encoder / adapter trainable as configured."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pcfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    try:
        model.llm = get_peft_model(model.llm, pcfg)
    except ValueError as e:  # e.g. target modules not found in this LLM
        raise ModelLoadError(f"lora.target_modules={cfg.target_modules}: {e}") from e
    set_encoder_trainable(model, cfg.train_encoder)
    for p in model.adapter.parameters():
        p.requires_grad_(cfg.train_adapter)
    model.train(model.training)  # the new LoRA modules start in training mode: follow the model's


def set_encoder_trainable(model: Any, trainable: bool) -> None:
    """Train the encoder (fp32 master weights), except Whisper's fixed sinusoidal positions."""
    if trainable:
        model.encoder.to(torch.float32)  # autocast does the rest
    for name, p in model.encoder.named_parameters():
        p.requires_grad_(trainable and "embed_positions" not in name)


def save_finetuned(model: Any, path: Path, train_encoder: bool) -> None:
    """Adapter (``save_pretrained``) + ``lora/`` + the encoder weights when they were trained."""
    from safetensors.torch import save_file

    model.save_pretrained(path)
    model.llm.save_pretrained(str(path / LORA_DIR))
    if train_encoder:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.encoder.whisper.state_dict().items()}
        save_file(state, str(path / ENCODER_WEIGHTS), metadata={"format": "pt"})


def load_lora_weights(model: Any, path: Path) -> None:
    """Load ``path/lora`` into an LLM that ``apply_lora`` already wrapped, and the encoder weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / LORA_DIR / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{path / LORA_DIR}: no LoRA weights (adapter_model.safetensors)")
    result = set_peft_model_state_dict(model.llm, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelLoadError(f"{weights}: LoRA weights do not fit this LLM ({unexpected[:3]}...)")
    model.load_encoder_weights(path)


def load_finetuned(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    merge: bool = True,
) -> Any:
    """A :class:`BlspModel` with its fine-tuned LoRA (merged for speed by default) and encoder:
    ``BlspModel.from_pretrained`` loads both, so every loader gets them."""
    from blsp.models.modeling_blsp import BlspModel

    return BlspModel.from_pretrained(path, device=device, dtype=dtype, merge_lora=merge)
