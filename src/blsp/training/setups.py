"""What a run trains (its training setup): the model, its loss module, its collator, and how its weights are saved.

``build_setup(cfg, device)`` returns a :class:`TrainingSetup` for the recipe's objective:

- :class:`BlspSetup` (``ce``, ``kl``, ``ce+kl``; ASR pretraining; LoRA fine-tuning),
- :class:`CtcSetup` (``ctc``: the CTC projector on the adapter output),
- :class:`SftSetup` (``sft``: stage-1 instruction tuning of the LLM alone).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blsp.errors import ConfigError, ModelLoadError
from blsp.training.config import Config
from blsp.training.data import Example
from blsp.utils.torch import torch_dtype

log = logging.getLogger(__name__)

_RESERVED = {"encoder", "llm", "encoder_dim", "llm_dim", "ctc_vocab_size"}


def enable_gradient_checkpointing(llm: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with frozen weights)."""
    kwargs = {"use_reentrant": False}
    base = getattr(llm, "get_base_model", lambda: llm)()  # a peft model wraps the HF model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def mark_checkpointed_layers_training(llm: nn.Module) -> None:
    """HF checkpoints a layer only when ``layer.training``; set that flag on the layers alone so the
    frozen LLM's dropout and other submodules stay in eval mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in llm.modules():
        if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False):
            m.training = True


class TrainingSetup:
    """Interface the trainer drives."""

    name = "setup"
    loss: nn.Module
    collate: Callable[[list[Example]], dict[str, Any]]
    needs_transcript = False
    cache: Any = None
    gradient_checkpointing = False
    tokenizer: Any = None  # the LLM's tokenizer
    saves_frozen = False  # its save writes frozen weights too (gathered under FSDP / ZeRO-3)

    def count_tokens(self, text: str) -> int:
        """LLM tokens of ``text`` (no special tokens): what ``data.max_text_tokens`` limits."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.loss.named_parameters() if p.requires_grad]

    def train_mode(self, mode: bool) -> None:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def save_final(self, path: Path) -> None:
        self.save(path)

    def check_examples(self, examples: list[Example]) -> None:
        """Warn about data that does not fit this model (default: nothing to check)."""

    def prepare(self, examples: list[Example]) -> None:
        """Set up what depends on the training data, on every rank, before the optimizer is made."""


# --------------------------------------------------------------------------- BLSP model
def _blsp_config(cfg: Config) -> Any:
    from blsp.models.configuration_blsp import BlspConfig

    if cfg.model.init_from:
        init = Path(cfg.model.init_from)
        if not (init / "config.json").is_file():
            raise ModelLoadError(f"model.init_from={init}: not a BLSP model folder (no config.json)")
        bc = BlspConfig.from_pretrained(str(init))
        if cfg.model.blsp:
            log.warning("model.blsp is ignored: model.init_from=%s decides the architecture", init)
        return bc
    allowed = set(inspect.signature(BlspConfig.__init__).parameters) - {"self", "kwargs"} - _RESERVED
    for key in cfg.model.blsp:
        if key not in allowed:
            raise ConfigError(f"unknown config key 'model.blsp.{key}'; known: {', '.join(sorted(allowed))}")
    return BlspConfig(encoder=cfg.model.encoder, llm=cfg.model.llm, **cfg.model.blsp)


def build_blsp_model(cfg: Config, device: torch.device) -> tuple[Any, dict[str, torch.Tensor]]:
    """The BLSP model of the recipe (no CTC head), and the initial weights from ``init_from``."""
    from blsp.models.hub import ADAPTER_WEIGHTS
    from blsp.models.modeling_blsp import BlspModel

    bc = _blsp_config(cfg)
    bc.ctc_vocab_size = None
    for attr in ("ctc_vocab", "ctc_upsample", "ctc_normalize"):
        if hasattr(bc, attr):
            delattr(bc, attr)
    model = BlspModel.from_config(bc, device=device, dtype=torch_dtype(cfg.model.dtype))
    state: dict[str, torch.Tensor] = {}
    if cfg.model.init_from:
        from safetensors.torch import load_file

        weights = Path(cfg.model.init_from) / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ModelLoadError(f"model.init_from: {weights} not found")
        state = load_file(str(weights))
        adapter = {k[len("adapter.") :]: v for k, v in state.items() if k.startswith("adapter.")}
        try:
            model.adapter.load_state_dict(adapter)
        except RuntimeError as e:
            raise ModelLoadError(f"{weights}: adapter weights do not fit ({e})") from e
        log.info("adapter initialised from %s", weights)
    return model, state


def _make_cache(cfg: Config, model: Any) -> Any:
    if not cfg.data.encoder_cache:
        return None
    from blsp.training.cache import EncoderCache, encoder_fingerprint

    return EncoderCache(cfg.data.encoder_cache, encoder_fingerprint(model.encoder), cfg.data.cache_dtype)


class BlspSetup(TrainingSetup):
    """Adapter training with ``ce`` / ``kl`` / ``ce+kl``; with ``lora.enabled``, fine-tuning."""

    def __init__(self, cfg: Config, device: torch.device, model: Any = None) -> None:
        from blsp.training.objectives import BlspCollator, BlspLoss

        self.name = cfg.train.objective
        self.model = model if model is not None else build_blsp_model(cfg, device)[0]
        self.tokenizer = self.model.tokenizer
        self.lora = cfg.lora.enabled
        self.train_encoder = self.lora and cfg.lora.train_encoder
        if self.lora:
            from blsp.training.finetune import apply_lora, load_lora_weights

            apply_lora(self.model, cfg.lora)
            if cfg.model.init_from and (Path(cfg.model.init_from) / "lora").is_dir():
                load_lora_weights(self.model, Path(cfg.model.init_from))
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(self.model.llm)
            self.gradient_checkpointing = True
        if self.train_encoder and cfg.data.encoder_cache:
            log.warning("data.encoder_cache is ignored: the encoder is being trained (lora.train_encoder)")
        self.cache = None if self.train_encoder else _make_cache(cfg, self.model)
        teacher = cfg.train.objective in ("kl", "ce+kl")
        self.needs_transcript = teacher
        self.collate = BlspCollator(self.model, teacher=teacher, cache=self.cache)
        t = cfg.train
        self.loss = BlspLoss(
            self.model,
            t.objective,
            ce_weight=t.ce_weight,
            kl_weight=t.kl_weight,
            temperature=t.kl_temperature,
            train_encoder=self.train_encoder,
            shared_head=t.shared_head,
        )

    def check_examples(self, examples: list[Example], limit: int = 64) -> None:
        """Warn when behavior responses were generated from another text-path prompt (another LLM,
        tokenizer or template than this model's), using the ``prompt_sha1`` of ``blsp behaviors``."""
        from blsp.models.prompt import make_conversation, prompt_fingerprint

        tagged = [e for e in examples if e.prompt_sha1 and e.transcript][:limit]
        bad = [
            e.id
            for e in tagged
            if prompt_fingerprint(
                self.model.prompt.text_prompt(make_conversation(e.instruction, transcript=e.transcript))
            )
            != e.prompt_sha1
        ]
        if bad:
            log.warning(
                "%d of %d checked behavior lines were generated from a different text-path prompt than this "
                "model's (another LLM, tokenizer or prompt template?), e.g. %s: step 2 then does not mirror step 1",
                len(bad),
                len(tagged),
                ", ".join(bad[:3]),
            )

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        from blsp.training.objectives import attach_encoder_states

        if not self.train_encoder:
            attach_encoder_states(self.model, batch, self.cache)
        out = {"student": batch["student"]}
        if "teacher" in batch:
            out["teacher"] = batch["teacher"]
        return out

    def train_mode(self, mode: bool) -> None:
        self.model.train(mode)
        if mode and self.gradient_checkpointing:
            mark_checkpointed_layers_training(self.model.llm)

    def save(self, path: Path) -> None:
        if self.lora:
            from blsp.training.finetune import save_finetuned

            save_finetuned(self.model, path, self.train_encoder)
        else:
            self.model.save_pretrained(path)

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        from blsp.models.hub import ADAPTER_WEIGHTS

        self.model.load_trainable_state_dict(load_file(str(path / ADAPTER_WEIGHTS)), source=str(path))
        if self.lora:
            from blsp.training.finetune import load_lora_weights

            load_lora_weights(self.model, path)


class CtcSetup(TrainingSetup):
    """The CTC baseline: adapter + CTC projector trained on transcripts (no LLM forward)."""

    name = "ctc"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.model, self.init_state = build_blsp_model(cfg, device)
        self.tokenizer = self.model.tokenizer
        self.cache = _make_cache(cfg, self.model)
        self.needs_transcript = True
        if cfg.ctc.vocab != "embeddings":  # otherwise the labels come from the data: see prepare
            self._build(None)

    def prepare(self, examples: list[Example]) -> None:
        if self.cfg.ctc.vocab == "embeddings":
            from blsp.models.ctc import normalize_transcript

            norm = normalize_transcript if self.cfg.ctc.normalize else str
            texts = {norm(e.transcript if e.transcript is not None else e.response) for e in examples}
            tok = self.model.tokenizer
            self._build(
                sorted({t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]})
            )

    def _build(self, token_ids: list[int] | None) -> None:
        from blsp.models.adapter import EmbeddingCtcHead
        from blsp.models.ctc import configure_ctc
        from blsp.training.ctc import CtcCollator, CtcLoss

        cfg, model = self.cfg, self.model
        try:
            vocab = configure_ctc(
                model.config, model.tokenizer, cfg.ctc.vocab, cfg.ctc.upsample, cfg.ctc.normalize, token_ids
            )
        except ValueError as e:
            raise ConfigError(f"ctc: {e}") from e
        if cfg.ctc.vocab == "embeddings":
            head: nn.Module = EmbeddingCtcHead(model.llm.get_input_embeddings(), vocab.size, token_ids)
        else:
            head = nn.Linear(model.config.llm_dim, model.config.ctc_vocab_size)
        model.extra["ctc"] = head.to(self.device)
        init = self.init_state
        head_state = {k[len("extra.ctc.") :]: v for k, v in init.items() if k.startswith("extra.ctc.")}
        mine = head.state_dict()
        if head_state and all(k in head_state and head_state[k].shape == v.shape for k, v in mine.items()):
            head.load_state_dict(head_state)
            log.info("CTC projector initialised from %s", cfg.model.init_from)
        self.collate = CtcCollator(model, vocab, cfg.ctc.upsample, cache=self.cache)
        self.loss = CtcLoss(model, vocab, cfg.ctc.upsample)

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        from blsp.training.objectives import attach_encoder_states

        attach_encoder_states(self.model, batch, self.cache)
        return {
            "student": batch["student"],
            "targets": batch["targets"],
            "target_lengths": batch["target_lengths"],
        }

    def train_mode(self, mode: bool) -> None:
        self.model.train(mode)

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path)

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        from blsp.models.hub import ADAPTER_WEIGHTS

        self.model.load_trainable_state_dict(load_file(str(path / ADAPTER_WEIGHTS)), source=str(path))


class SftSetup(TrainingSetup):
    """Stage 1: instruction-tune the LLM (all weights, or LoRA) on Alpaca-style lines."""

    name = "sft"
    saves_frozen = True  # the whole LLM (LoRA merged into it)

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from blsp.models.hub import load_llm
        from blsp.training.sft import SftCollator, SftLoss, paper_chat_template

        dtype = torch_dtype(cfg.model.dtype) or torch.float32
        self.llm, self.tokenizer = load_llm(cfg.model.llm, dtype=dtype)
        self.llm.to(device)
        self.cfg = cfg
        self.lora = cfg.lora.enabled
        if self.lora:
            from peft import LoraConfig, get_peft_model

            pcfg = LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                bias="none",
            )
            self.llm = get_peft_model(self.llm, pcfg)
        else:
            for p in self.llm.parameters():
                p.requires_grad_(True)
            if hasattr(self.llm.config, "use_cache"):
                self.llm.config.use_cache = False
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(self.llm)
        if cfg.sft.template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("sft.template=chat but the LLM's tokenizer has no chat template (use paper)")
        self.chat_template = paper_chat_template(self.tokenizer) if cfg.sft.template == "paper" else None
        self.collate = SftCollator(self.tokenizer, cfg.sft.template)
        self.loss = SftLoss(self.llm)

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"student": batch["student"]}

    def train_mode(self, mode: bool) -> None:
        self.llm.train(mode)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_model

        path.mkdir(parents=True, exist_ok=True)
        if self.lora:
            self.llm.save_pretrained(str(path))
        else:
            save_model(self.llm, str(path / "model.safetensors"), metadata={"format": "pt"})

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file, load_model

        if self.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.llm, load_file(str(path / "adapter_model.safetensors")))
        else:
            load_model(self.llm, str(path / "model.safetensors"))

    def save_final(self, path: Path) -> None:
        from blsp.training.sft import save_llm_folder

        llm = self.llm
        if self.lora and self.cfg.sft.merge_lora:
            llm = llm.merge_and_unload()
            self.llm = llm
        elif self.lora:
            llm.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))
            return
        save_llm_folder(llm, self.tokenizer, path, self.chat_template)


def build_setup(cfg: Config, device: torch.device, model: Any = None) -> TrainingSetup:
    """The training setup of ``cfg``; ``model`` (a ``BlspModel``) is trained in place of building one (ce/kl)."""
    obj = cfg.train.objective
    if model is not None and (obj in ("ctc", "sft") or cfg.lora.enabled):
        raise ConfigError(f"a prebuilt model can only be given for ce/kl adapter training, not {obj!r}/LoRA")
    if obj == "ctc":
        return CtcSetup(cfg, device)
    if obj == "sft":
        return SftSetup(cfg, device)
    return BlspSetup(cfg, device, model=model)
