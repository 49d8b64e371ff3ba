"""``BlspModel``: frozen Whisper encoder -> trainable modality adapter -> frozen LLM.

The data path, in order: audio -> log-mel (``SpeechEncoder.features``, in ``collate``) ->
encoder (``SpeechEncoder.forward``) -> adapter (``ModalityAdapter``) -> the LLM's input
embeddings, where the adapter outputs fill the speech positions that ``collate`` laid out from
the prompt segments (``PromptBuilder``). Only the adapter (and optional extra heads) is saved.

Longer than 500 lines because ``BlspModel`` is one ``transformers`` ``PreTrainedModel``: loading
and saving (with a fine-tune's LoRA and encoder weights), the batch layout (``collate``), the
speech splice (``embed``) and ``forward`` are its methods. Generation is not: ``generate`` calls
``generation_blsp``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from blsp.errors import AudioError, BlspError, ModelLoadError
from blsp.models import generation_blsp
from blsp.models.adapter import EmbeddingCtcHead, ModalityAdapter
from blsp.models.configuration_blsp import BlspConfig
from blsp.models.encoder import SpeechEncoder
from blsp.models.hub import (
    ADAPTER_WEIGHTS,
    ENCODER_WEIGHTS,
    LORA_DIR,
    MODEL_CARD,
    REINSTALL_HINT,
    is_pretrained_adapter,
    load_llm,
    load_whisper,
    resolve_adapter,
)
from blsp.models.prompt import MIN_SHARED_PREFIX, AudioSpan, PromptBuilder

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def write_adapter_folder(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write ``adapter.safetensors`` (``state``) and ``config.json`` (``config``) atomically into ``path``."""
    from blsp.utils.io import atomic_write_text

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = path / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / ADAPTER_WEIGHTS)
    atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")


@dataclass
class BlspOutput:
    """``loss`` (mean token cross-entropy over ``labels != -100``), ``logits [B, L, V]``, ``labels``."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    labels: torch.Tensor | None = None


def is_finetuned(path: str | Path) -> bool:
    """Whether a BLSP folder holds a fine-tune of the frozen models (LoRA or encoder weights)."""
    return (Path(path) / LORA_DIR).is_dir() or (Path(path) / ENCODER_WEIGHTS).is_file()


def model_card_text(config: Any, name: str) -> str:
    """A model card for a BLSP folder: hub metadata, what it is, how to load it, intended use."""
    return "\n".join(
        [
            "---",
            "library_name: blsp",
            f"base_model: {config.llm}",
            "pipeline_tag: automatic-speech-recognition",
            "tags: [blsp, speech, behavior-alignment]",
            "---",
            f"# {name}",
            "",
            f"A BLSP modality adapter for the frozen `{config.encoder}` encoder and the frozen "
            f"`{config.llm}` LLM (adapter weights only; the folder's config names both models). "
            f"Load it with `BlspModel.from_pretrained({name!r})` or "
            f"`transformers.AutoModel.from_pretrained(...)` after `import blsp`, or talk to it with `blsp chat`.",
            "",
            "## Intended use",
            "",
            "Research on behavior alignment: speech in, text out, following text instructions about the "
            "speech (repeat, continue, answer); the frozen LLM's abilities bound what it can answer.",
            "",
        ]
    )


def _open_adapter_folder(ref: str | Path | None, **hub_kwargs: Any) -> tuple[Path, BlspConfig, str]:
    """The folder of an adapter reference, its config, and the reinstall hint of a shipped one."""
    path = resolve_adapter(ref, **hub_kwargs)
    hint = f"; {REINSTALL_HINT}" if is_pretrained_adapter(path) else ""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a BLSP model folder (no config.json)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"{path}: no {ADAPTER_WEIGHTS} in the folder")
    try:
        config = BlspConfig.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path / 'config.json'}: cannot read the BLSP config ({e}){hint}") from e
    return path, config, hint


def read_weights(weights: Path, hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a ModelLoadError naming the file (and ``hint``) otherwise."""
    try:
        return load_file(str(weights))
    except Exception as e:
        raise ModelLoadError(f"{weights}: cannot read adapter weights ({e}){hint}") from e


def _load_frozen(
    config: BlspConfig, dtype: torch.dtype | None, **llm_kwargs: Any
) -> tuple[SpeechEncoder, nn.Module, Any]:
    """The frozen encoder, LLM and tokenizer that ``config`` names (fp32 unless ``dtype``);
    ``llm_kwargs``: ``quantization``, ``device_map`` (see ``hub.load_llm``)."""
    dtype = dtype or torch.float32
    whisper, processor = load_whisper(config.encoder, dtype=dtype)
    encoder = SpeechEncoder(whisper.get_encoder(), processor.feature_extractor)
    del whisper  # the decoder is not part of BLSP
    llm, tokenizer = load_llm(
        config.llm, dtype=dtype, **{k: v for k, v in llm_kwargs.items() if v is not None}
    )
    return encoder, llm, tokenizer


def config_key(config: Any) -> str:
    """Everything of a ``BlspConfig`` that fixes the models and the adapter's shape: adapters with
    the same key fit one loaded model (bookkeeping fields such as versions are left out)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    skip = {"transformers_version", "blsp_version", "architectures", "auto_map"}
    return json.dumps(
        {k: v for k, v in d.items() if not k.startswith("_") and k not in skip}, sort_keys=True, default=str
    )


class BlspModel(PreTrainedModel):
    """A BLSP speech-language model, a ``transformers`` ``PreTrainedModel``.

    Build with ``from_pretrained`` (a folder, a shipped name or a hub id; also through
    ``AutoModel`` after ``import blsp``), ``from_config``, or ``BlspModel(config)``, which loads
    the encoder and LLM that ``config`` names. Only the trainable weights are ever saved.
    """

    config_class = BlspConfig
    base_model_prefix = "blsp"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(
        self,
        config: BlspConfig,
        encoder: SpeechEncoder | None = None,
        llm: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(config)
        if encoder is None or llm is None or tokenizer is None:
            encoder, llm, tokenizer = _load_frozen(config, dtype=None)
        self.encoder = encoder
        self.llm = llm
        self.tokenizer = tokenizer
        enc_dim = encoder.hidden_size
        llm_dim = llm.get_input_embeddings().embedding_dim
        for name, want, got in (
            ("encoder_dim", config.encoder_dim, enc_dim),
            ("llm_dim", config.llm_dim, llm_dim),
        ):
            if want is not None and want != got:
                raise ModelLoadError(
                    f"adapter config has {name}={want} but the loaded model has width {got} "
                    f"(encoder={config.encoder!r}, llm={config.llm!r}): this adapter was trained for other models"
                )
        config.encoder_dim, config.llm_dim = enc_dim, llm_dim
        self.adapter = ModalityAdapter(
            enc_dim,
            llm_dim,
            kernel_sizes=config.adapter_kernel_sizes,
            stride=config.adapter_stride,
            bottleneck_dim=config.adapter_bottleneck_dim,
        )
        scale = getattr(config, "adapter_init_scale", 1.0)
        if scale == "embeddings":
            scale = float(llm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
        with torch.no_grad():
            self.adapter.norm.weight.fill_(float(scale))
        self.model_card: str | None = (
            None  # the README.md this model was loaded with, kept by save_pretrained
        )
        self.extra = nn.ModuleDict()  # optional trainable heads saved with the adapter (e.g. "ctc")
        if config.ctc_vocab_size:
            self.extra["ctc"] = self._ctc_head(config, llm)
        self.prompt = PromptBuilder.from_config(tokenizer, config)
        for p in [*self.encoder.parameters(), *self.llm.parameters()]:
            p.requires_grad_(False)
        self.adapter.to(torch.float32)
        self.train(False)

    @staticmethod
    def _ctc_head(config: BlspConfig, llm: nn.Module) -> nn.Module:
        if config.ctc_vocab == "embeddings":
            return EmbeddingCtcHead(llm.get_input_embeddings(), config.ctc_vocab_size)
        return nn.Linear(llm.get_input_embeddings().embedding_dim, config.ctc_vocab_size)

    # ------------------------------------------------------------- building
    @classmethod
    def from_config(
        cls,
        config: BlspConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
        device_map: str | dict[str, Any] | None = None,
        **overrides: Any,
    ) -> BlspModel:
        """Load the encoder and LLM named by ``config`` and attach a freshly initialised adapter.

        ``quantization`` (``int8`` on CPU, ``bnb-8bit``/``bnb-4bit`` on CUDA) and ``device_map``
        (``"auto"``: accelerate spreads the LLM) apply to the frozen LLM, for inference; the
        encoder and adapter then go to the device of the LLM's input embeddings.
        """
        config = config or BlspConfig()
        for k, v in overrides.items():
            setattr(config, k, v)
        from blsp.utils.torch import resolve_device

        device = resolve_device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = cls(config, *_load_frozen(config, dtype, quantization=quantization, device_map=device_map))
        if (quantization or "").startswith("bnb-") or device_map is not None:
            placed = model.llm.get_input_embeddings().weight.device  # accelerate placed the LLM
            model.encoder.to(placed)
            model.adapter.to(placed)
            model.extra.to(placed)
            return model
        return model.to(device)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path | None = None,
        *model_args: Any,
        config: BlspConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        merge_lora: bool = True,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> BlspModel:
        """Load a saved BLSP folder and the frozen models its config names.

        ``pretrained_model_name_or_path``: a folder, a shipped adapter's name (``blsp-base``), a hub
        id (``org/name``; ``revision``, ``cache_dir``, ``local_files_only``, ``token`` as in
        ``transformers``), or None for the shipped default. A fine-tuned folder's ``lora/`` (merged
        into the LLM unless ``merge_lora=False``) and ``encoder.safetensors`` load with it.
        ``torch_dtype`` and a single-device ``device_map`` are accepted as in ``transformers``;
        other keyword arguments override config fields.
        """
        if model_args:
            raise BlspError(
                f"BlspModel.from_pretrained takes no positional model arguments, got {model_args!r}"
            )
        for k in ("trust_remote_code", "_from_auto", "_from_pipeline", "_commit_hash", "subfolder"):
            overrides.pop(k, None)
        dtype = overrides.pop("torch_dtype", None) if dtype is None else dtype
        device_map = overrides.pop("device_map", None)
        if device is None and isinstance(device_map, str | torch.device) and device_map != "auto":
            device, device_map = device_map, None
        if isinstance(dtype, str):
            from blsp.utils.torch import torch_dtype

            dtype = torch_dtype(dtype)  # None for auto: the device's default
        path, saved, hint = _open_adapter_folder(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        weights = path / ADAPTER_WEIGHTS
        model = cls.from_config(
            config or saved, device=device, dtype=dtype, device_map=device_map, **overrides
        )
        model.load_trainable_state_dict(read_weights(weights, hint), source=str(weights))
        model._load_finetune(path, merge_lora)
        model.name_or_path = str(pretrained_model_name_or_path or path)
        card = path / MODEL_CARD
        model.model_card = card.read_text(encoding="utf-8") if card.is_file() else None
        return model

    def _load_finetune(self, path: Path, merge_lora: bool = True) -> None:
        """The paper's Table 4 fine-tune, if ``path`` holds one: LoRA of the LLM and encoder weights."""
        lora = path / LORA_DIR
        if lora.is_dir():
            from peft import PeftModel

            try:
                self.llm = PeftModel.from_pretrained(self.llm, str(lora))
            except Exception as e:
                raise ModelLoadError(f"{lora}: cannot load the LoRA adapter ({e})") from e
            if merge_lora:
                self.llm = self.llm.merge_and_unload()
            for p in self.llm.parameters():
                p.requires_grad_(False)
        self.load_encoder_weights(path)
        self.train(False)

    def load_encoder_weights(self, path: Path) -> None:
        """Load a fine-tune's ``encoder.safetensors`` from ``path``, if it has one."""
        enc = path / ENCODER_WEIGHTS
        if enc.is_file():
            state = read_weights(enc)
            dtype = next(self.encoder.whisper.parameters()).dtype
            try:
                self.encoder.whisper.load_state_dict({k: v.to(dtype) for k, v in state.items()})
            except RuntimeError as e:
                raise ModelLoadError(
                    f"{enc}: encoder weights do not fit {self.config.encoder!r} ({e})"
                ) from e

    def load_adapter(self, path: str | Path | None = None) -> None:
        """Swap in the adapter (and extra heads) of another folder trained for this same config: the
        encoder and LLM stay loaded. A fine-tuned folder (LoRA or encoder weights) is refused: it
        changes the frozen models, so it loads on its own with ``from_pretrained``."""
        path, config, hint = _open_adapter_folder(path)
        if config_key(config) != config_key(self.config):
            raise ModelLoadError(
                f"{path}: trained for another config than the loaded model; load it on its own"
            )
        if is_finetuned(path):
            raise ModelLoadError(f"{path}: a fine-tuned folder (LoRA/encoder weights); load it on its own")
        weights = path / ADAPTER_WEIGHTS
        self.load_trainable_state_dict(read_weights(weights, hint), source=str(weights))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that BLSP trains: the adapter and any extra heads."""
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        state.update({f"extra.{k}": v for k, v in self.extra.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        adapter = {k[len("adapter.") :]: v for k, v in state.items() if k.startswith("adapter.")}
        extra = {k[len("extra.") :]: v for k, v in state.items() if k.startswith("extra.")}
        try:
            self.adapter.load_state_dict(adapter)
            self.extra.load_state_dict(extra)
        except RuntimeError as e:
            raise ModelLoadError(f"{source}: adapter weights do not fit this config ({e})") from e

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``config.json``, ``adapter.safetensors`` (the trainable weights only, never the
        encoder or LLM) and a model card ``README.md`` (the one this model was loaded with, else a
        new one). ``push_to_hub=True`` then uploads the folder (``repo_id`` defaults to its name)."""
        from blsp.utils.io import atomic_write_text

        path = Path(save_directory)
        write_adapter_folder(path, self.trainable_state_dict(), self.config.to_dict())
        atomic_write_text(path / MODEL_CARD, self.model_card or model_card_text(self.config, path.name))
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", path.name), **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **_: Any,
    ) -> Any:
        """Upload this model's folder (config, trainable weights, model card) to a hub repo."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message or "Upload BLSP adapter",
                revision=revision,
                create_pr=create_pr,
            )

    # ------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> BlspModel:
        """Only the trainable parts follow ``mode``: the adapter, extra heads and a LoRA's dropout.

        The encoder and LLM stay in eval mode (their own dropout never applies to frozen weights).
        """
        self.training = mode
        self.adapter.train(mode)
        self.extra.train(mode)
        self.encoder.eval()
        self.llm.eval()
        for name, module in self.llm.named_modules():
            if name.endswith("lora_dropout"):
                module.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------- lengths
    def speech_length(self, frames: int) -> int:
        """Number of LLM positions a clip of ``frames`` mel frames occupies."""
        return int(self.adapter.output_lengths(self.encoder.output_length(frames)))

    # ------------------------------------------------------------- collate
    def _audio_features(self, audio: Any) -> torch.Tensor:
        if isinstance(audio, torch.Tensor) and audio.dim() == 2:
            return audio  # precomputed log-mel [mel, frames]
        if isinstance(audio, str | Path):
            from blsp.data.audio import load_audio

            audio = load_audio(audio, sr=self.encoder.sampling_rate)
        elif isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu().numpy()
        try:
            return self.encoder.features(np.asarray(audio))
        except AudioError:
            raise
        except Exception as e:
            raise AudioError(f"cannot compute features: {e}") from e

    def collate(self, examples: list[dict[str, Any]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Lay out a batch: token ids, speech positions, labels, masks and log-mel features.

        Each example is ``{"conversation": [...], "response": str | None}``. Speech positions hold
        the pad id in ``input_ids`` and are marked in ``speech_mask``; their count per clip is known
        from the clip's length alone, so the layout is fixed before the encoder runs.
        """
        if padding_side not in ("left", "right"):
            raise BlspError(f"padding_side must be left or right, not {padding_side!r}")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        rows, feats = [], []
        for n, ex in enumerate(examples):
            prompt = self.prompt.build(ex["conversation"], add_generation_prompt=True)
            ids: list[int] = []
            speech: list[bool] = []
            for seg in prompt.segments:
                if isinstance(seg, AudioSpan):
                    try:
                        f = self._audio_features(seg.audio)
                    except AudioError as e:
                        where = seg.audio if isinstance(seg.audio, str | Path) else f"example {n}"
                        raise AudioError(f"{where}: {e}") from e
                    feats.append(f)
                    k = self.speech_length(f.shape[-1])
                    ids += [pad_id] * k
                    speech += [True] * k
                else:
                    ids += seg
                    speech += [False] * len(seg)
            labels = [IGNORE_INDEX] * len(ids)
            response = ex.get("response")
            if response is not None:
                target = self.prompt.response_ids(response)
                ids += target
                labels += target
                speech += [False] * len(target)
            rows.append((ids, speech, labels))

        length = max(len(r[0]) for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
            "speech_mask": torch.zeros((len(rows), length), dtype=torch.bool),
            "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
        }
        for i, (ids, speech, labels) in enumerate(rows):
            sl = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            batch["input_ids"][i, sl] = torch.tensor(ids)
            batch["attention_mask"][i, sl] = 1
            batch["speech_mask"][i, sl] = torch.tensor(speech)
            batch["labels"][i, sl] = torch.tensor(labels)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if feats:
            frames = torch.tensor([f.shape[-1] for f in feats])
            x = torch.zeros(len(feats), feats[0].shape[0], int(frames.max()))
            for i, f in enumerate(feats):
                x[i, :, : f.shape[-1]] = f
            batch["input_features"], batch["feature_lengths"] = x, frames
        return batch

    # ------------------------------------------------------------- forward
    @torch.no_grad()
    def encode_speech(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen encoder outputs ``([N, T', D], lengths [N])`` (cacheable: no gradient)."""
        feats = input_features.to(self.device, self.encoder.whisper.conv1.weight.dtype)
        return self.encoder(feats, feature_lengths.to(self.device))

    def speech_embeddings(
        self,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter outputs ``([N, T'', llm_dim], lengths [N])`` from features or cached encoder states."""
        if encoder_hidden_states is None:
            if input_features is None or feature_lengths is None:
                raise BlspError(
                    "speech positions present but no input_features or encoder_hidden_states given"
                )
            encoder_hidden_states, encoder_lengths = self.encode_speech(input_features, feature_lengths)
        x = encoder_hidden_states.to(self.device, torch.float32)
        y, lengths = self.adapter(x, encoder_lengths.to(self.device))
        return y, lengths

    def embed(
        self,
        input_ids: torch.Tensor,
        speech_mask: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
        speech_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings of the LLM with the adapter outputs at the speech positions.

        The adapter outputs come from features, from cached encoder states, or ready made:
        ``speech_embeds [positions, llm_dim]``, every clip's outputs one after the other in the
        order of the speech positions (what ``ChatSession`` keeps per clip between turns).
        """
        input_ids = input_ids.to(self.device)
        speech_mask = speech_mask.to(self.device)
        embeds = self.llm.get_input_embeddings()(input_ids)
        if speech_mask.any():
            if speech_embeds is not None:
                flat = speech_embeds.to(self.device)
            else:
                speech, lengths = self.speech_embeddings(
                    input_features, feature_lengths, encoder_hidden_states, encoder_lengths
                )
                valid = torch.arange(speech.shape[1], device=self.device)[None, :] < lengths[:, None]
                flat = speech[valid]
            if flat.shape[0] != int(speech_mask.sum()):
                raise BlspError(
                    f"batch layout has {int(speech_mask.sum())} speech positions but the adapter produced "
                    f"{flat.shape[0]}: features and input_ids come from different batches"
                )
            embeds = embeds.masked_scatter(speech_mask[..., None], flat.to(embeds.dtype))
        return embeds

    def embed_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``embed`` of a ``collate`` batch (token ids, speech positions and features)."""
        return self.embed(
            batch["input_ids"],
            batch["speech_mask"],
            batch.get("input_features"),
            batch.get("feature_lengths"),
        )

    def shared_head_length(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, speech_mask: torch.Tensor, limit: int
    ) -> int:
        """Positions ``0..n-1`` that every row shares (same tokens, unmasked, no speech), ``n <= limit``.

        In a right-padded BLSP batch that is the system prompt and the instruction: it comes before
        the speech, so with a frozen LLM its keys and values depend on nothing that trains.
        """
        if input_ids.shape[0] < 2 or limit < MIN_SHARED_PREFIX:
            return 0
        same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0) & ~speech_mask.any(0)
        differ = (~same[:limit]).nonzero()
        n = int(differ[0]) if len(differ) else limit
        return n if n >= MIN_SHARED_PREFIX else 0

    def _head_cache(self, head_ids: torch.Tensor, rows: int) -> Any:
        cache = generation_blsp.new_cache(self.llm)
        with torch.no_grad():
            self.llm(
                input_ids=head_ids.to(self.device),
                use_cache=True,
                logits_to_keep=1,
                **generation_blsp.cache_kwargs(self.llm, cache),
            )
        cache.batch_repeat_interleave(rows)
        return cache

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        speech_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        share_head: bool = False,
        **llm_kwargs: Any,
    ) -> BlspOutput:
        """Run the LLM on the batch; ``loss`` only when ``labels`` are given and all logits are kept.

        ``share_head``: with a frozen LLM and ``logits_to_keep > 0``, the rows' shared head is run
        once, without gradient, and its KV repeated for every row; the logits are the same.
        """
        attention_mask = attention_mask.to(self.device)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        position_ids = position_ids.to(self.device)
        n = 0
        if share_head and logits_to_keep > 0 and not any(p.requires_grad for p in self.llm.parameters()):
            limit = input_ids.shape[1] - logits_to_keep
            n = self.shared_head_length(
                input_ids, attention_mask, speech_mask.to(attention_mask.device), limit
            )
        if n:
            llm_kwargs.update(
                generation_blsp.cache_kwargs(
                    self.llm, self._head_cache(input_ids[:1, :n], input_ids.shape[0])
                )
            )
            input_ids, speech_mask, position_ids = input_ids[:, n:], speech_mask[:, n:], position_ids[:, n:]
        embeds = self.embed(
            input_ids, speech_mask, input_features, feature_lengths, encoder_hidden_states, encoder_lengths
        )
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_to_keep,
            **llm_kwargs,
        )
        logits = out.logits
        loss = None
        if labels is not None and logits.shape[1] == labels.shape[1]:
            labels = labels.to(self.device)
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:]
            loss = nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return BlspOutput(loss=loss, logits=logits, labels=labels)

    # ------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        examples: list[dict[str, Any]],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        streamer: Any = None,
        return_ids: bool = False,
        *,
        params: generation_blsp.GenerationParams | None = None,
        stop: Sequence[str] = (),
        loop_guard: bool = True,
    ) -> list[str] | list[list[int]]:
        """Batched generation for speech, text, or mixed conversations (left padded), greedy by default.

        The settings are ``generate``'s (``do_sample``, then ``temperature`` and ``top_p``; ``loop_guard``
        ends an answer that falls into a loop) or one ``GenerationParams`` (``params``, which wins). Returns the answers' texts, or their token ids
        (``return_ids``) up to the end-of-turn token; ``blsp.models.generation_blsp.generate`` gives
        whole ``GenerationResult`` objects.
        """
        if params is None:
            params = generation_blsp.GenerationParams.from_flags(
                do_sample=do_sample,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                top_p=top_p,
                stop=tuple(stop),
                loop_guard=loop_guard,
            )
        results = generation_blsp.generate(self, examples, params, streamer=streamer)
        if return_ids:
            return [r.token_ids for r in results]
        return [r.text for r in results]

    def num_parameters(
        self, only_trainable: bool = False, exclude_embeddings: bool = False, **kw: Any
    ) -> int:
        """Parameters of the whole model, or only the trainable ones (``trainable_only`` also accepted)."""
        only = only_trainable or kw.get("trainable_only", False)
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only)
