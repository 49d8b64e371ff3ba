"""Typed training configuration: YAML recipes (shipped in ``blsp/recipes/``) loaded into dataclasses.

A recipe is data: ``load_config("blsp", overrides=["train.lr=1e-4"])`` reads the YAML (a shipped
recipe's name or a path, see :func:`blsp.recipes.recipe_path`),
applies ``--set`` overrides (dotted keys, YAML-typed values), and checks every key and value
against the dataclasses below. An unknown key is a :class:`~blsp.errors.ConfigError` that names
the file and the dotted key (with the closest known key). The resolved config is written into
the run directory so a run can be resumed, compared and reproduced.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from blsp.errors import ConfigError
from blsp.models.hub import DEFAULT_LLM, DEFAULT_WHISPER

Objective = Literal["ce", "kl", "ce+kl", "ctc", "sft"]
ExampleKind = Literal["behavior", "repetition", "asr", "target", "alpaca"]
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
EXAMPLE_KINDS: tuple[str, ...] = typing.get_args(ExampleKind)


@dataclass
class ModelConfig:
    """What to train. ``encoder``/``llm`` are model references (aliases, hub ids, folders, .gguf)."""

    encoder: str = DEFAULT_WHISPER
    llm: str = DEFAULT_LLM
    # A BLSP model folder (``save_pretrained`` output) whose adapter (and CTC head / LoRA) to start from.
    init_from: str | None = None
    # Further ``BlspConfig`` fields (adapter_kernel_sizes, adapter_bottleneck_dim, prompt_template, ...).
    blsp: dict[str, Any] = field(default_factory=dict)
    # dtype of the frozen weights: auto = bfloat16 on CUDA, float32 on CPU. Trainable weights stay float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Recompute the LLM's activations in backward (saves memory for large LLMs).
    gradient_checkpointing: bool = False


@dataclass
class SourceConfig:
    """One training manifest (JSON Lines) and how to turn its lines into examples.

    ``task`` (the recipe key; its values are ``EXAMPLE_KINDS``) is what each line becomes:
    ``behavior`` (the line's instruction/behavior and response, from ``blsp behaviors``),
    ``repetition`` (response = transcript, paper Table 1), ``asr`` (an instruction drawn per
    example from the ~100 ASR instructions, response = transcript; the ASR-pretraining baseline),
    ``target`` (``instruction`` + the ``target_field`` of the line, e.g. a translation for
    fine-tuning), ``alpaca`` (text-only instruction data for stage 1).
    """

    path: str = ""
    task: ExampleKind = "behavior"
    # Relative share of this source in an epoch (mixing, e.g. repetition:continuation = 1:9). None = as is.
    weight: float | None = None
    # For task=target: a literal instruction or a task name (asr, st:German, snips, ...). Overrides the line's.
    instruction: str | None = None
    # Field with the response for task=target (e.g. "de", "translation").
    target_field: str = "response"
    # Field with the transcript (default: "transcript", else "text").
    transcript_field: str | None = None
    max_examples: int | None = None


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    eval: list[SourceConfig] = field(default_factory=list)
    min_duration: float = 0.0
    max_duration: float = 30.0
    # Batch utterances of similar length (within shuffled mega-batches of megabatch_factor batches).
    group_by_length: bool = True
    megabatch_factor: int = 50
    # Folder for cached frozen-encoder outputs (null: no cache). Keyed by audio identity + encoder hash.
    # A folder that cannot be written (read-only, full) is a warning: training goes on without storing.
    encoder_cache: str | None = None
    # dtype of the cached states; a freshly computed state is rounded to it too, so a cold and a warm
    # cache train bit-identically.
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Lines whose response (or, for kl/ctc, transcript) has more LLM tokens than this are skipped and
    # counted when the data is loaded, instead of running out of memory in a batch (null: no limit).
    max_text_tokens: int | None = 1024
    # Examples per epoch when sources are mixed by weight (default: total of the sources).
    epoch_size: int | None = None
    # DataLoader worker processes reading audio and collating batches (0 = in the training process).
    num_workers: int = 0
    eval_max_examples: int = 256


@dataclass
class TrainConfig:
    """Optimisation (paper 4.1 / original code: lr 5e-5, warmup 1000, wd 0.05, clip 1.0, batch 768)."""

    objective: Objective = "ce"
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    kl_temperature: float = 2.0
    lr: float = 5e-5
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    global_batch_size: int = 768
    micro_batch_size: int = 8
    epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 42
    # auto: bf16 autocast on CUDA and on CPUs with bf16 instructions (AVX512-BF16/AMX), fp32 elsewhere
    # (bf16 as the paper; fp16 would need loss scaling). Trainable weights and AdamW stay fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Run the rows' shared head (system prompt, instruction) once a batch and reuse its KV (exact:
    # the head precedes the speech and the LLM is frozen). Off only to measure what it saves.
    shared_head: bool = True
    device: str = "auto"


@dataclass
class CtcConfig:
    """CTC projector on the adapter output (the CTC+LLM baseline's ASR model)."""

    # tokenizer: a linear layer over the LLM vocabulary; chars: characters; embeddings: cosine against
    # the frozen LLM's input embeddings of the training transcripts' tokens (the alignment warm start).
    vocab: Literal["tokenizer", "chars", "embeddings"] = "tokenizer"
    # Output labels per adapter frame: the adapter runs at ~6 frames/s, below the rate of characters.
    upsample: int = 1
    # Lower-case and strip punctuation from transcripts before training (like the original's normaliser).
    normalize: bool = True


@dataclass
class LoraConfig:
    """Downstream fine-tuning (paper Table 4): LoRA on the LLM's attention + encoder + adapter."""

    enabled: bool = False
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    train_encoder: bool = True
    train_adapter: bool = True
    # Stage 1 (objective=sft) with lora.enabled=false trains all LLM weights.


@dataclass
class SftConfig:
    """Stage 1: instruction-tune a base LLM on Alpaca-style JSON Lines."""

    # paper: the paper's ###[Human]/###[Assistant] format, also written as the saved tokenizer's
    # chat template; chat: the tokenizer's own chat template.
    template: Literal["paper", "chat"] = "paper"
    # Save the LLM with LoRA merged into its weights (an ordinary HF folder usable as model.llm).
    merge_lora: bool = True


@dataclass
class RunConfig:
    """Where and how often: checkpoints, evaluation, logging."""

    # Run directory; "{name}" is replaced by the config's name.
    output_dir: str = "runs/{name}"
    save_every: int = 500
    keep_last: int = 3
    eval_every: int = 500
    # with each held-out evaluation, the loss with another clip's speech (the content check)
    eval_shuffled: bool = True
    # also evaluate before the first step (the starting point: a warm start or a fresh adapter)
    eval_at_start: bool = False
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class DistributedConfig:
    """Multi-process training under accelerate launch / torchrun (docs/SCALING.md)."""

    # auto: nccl on CUDA, gloo on CPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # The engine is what the launch chose (accelerate config: blsp/recipes/accelerate/*.yaml; torchrun
    # gives DDP). auto accepts any; ddp, fsdp or deepspeed make a launch with another engine an
    # error (ddp also runs as one process). Adapter training needs no more than DDP: only the
    # adapter has gradients and optimizer state; FSDP / ZeRO pay off for stage-1 SFT of the LLM.
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    timeout_s: int = 1800


@dataclass
class Config:
    name: str = "blsp"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ctc: CtcConfig = field(default_factory=CtcConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir.replace("{name}", self.name))

    def identity(self) -> dict[str, Any]:
        """The parts that must match for ``--resume``: all that shapes the trained weights.

        Left out: logging, checkpoint/eval cadence, loader workers, the device and the process
        group settings (a run may resume with another number of processes: the global batches
        do not depend on it)."""
        d = self.to_dict()
        for k in (
            "log_every",
            "tensorboard",
            "progress",
            "keep_last",
            "save_every",
            "eval_every",
            "eval_shuffled",
        ):
            d["run"].pop(k, None)
        d["data"].pop("num_workers", None)
        d["train"].pop("device", None)
        d.pop("distributed", None)
        return d


# ---------------------------------------------------------------------- parsing
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, list | dict):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}; known keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, p in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not p.isdigit() or int(p) > len(node):
                raise ConfigError(f"--set {key}: no list item {p!r} at {'.'.join(parts[:i])}")
            if int(p) == len(node):  # one past the end: a new item
                node.append([] if nxt.isdigit() else {})
            node = node[int(p)]
            continue
        if p not in node or node[p] is None:
            node[p] = [] if nxt.isdigit() else {}
        node = node[p]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise ConfigError(f"--set {key}: no list item {last!r}")
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is not a section")


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from e
        out.append((key.strip(), value))
    return out


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> Config:
    """Build a :class:`Config` from a mapping and ``KEY=VALUE`` overrides."""
    tree = json.loads(json.dumps(data or {}))  # deep copy of plain data
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        cfg = _from_dict(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _validate(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (a path, or a shipped recipe's name: ``blsp``) and apply ``--set`` overrides."""
    from blsp.recipes import recipe_path

    path = recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(data, overrides, source=str(path))


def _validate(cfg: Config, source: str) -> None:
    t = cfg.train
    checks = [
        (t.lr > 0, "train.lr must be > 0"),
        (t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (t.global_batch_size >= 1, "train.global_batch_size must be >= 1"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.kl_temperature > 0, "train.kl_temperature must be > 0"),
        (t.epochs > 0, "train.epochs must be > 0"),
        (t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1"),
        (0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be within [0, 1]"),
        (cfg.run.save_every >= 1, "run.save_every must be >= 1"),
        (cfg.run.keep_last >= 1, "run.keep_last must be >= 1"),
        (cfg.run.eval_every >= 1, "run.eval_every must be >= 1"),
        (cfg.run.log_every >= 1, "run.log_every must be >= 1"),
        (cfg.ctc.upsample >= 1, "ctc.upsample must be >= 1"),
        (
            cfg.data.max_text_tokens is None or cfg.data.max_text_tokens >= 1,
            "data.max_text_tokens must be >= 1",
        ),
        (cfg.data.max_duration > cfg.data.min_duration, "data.max_duration must exceed data.min_duration"),
        (bool(cfg.data.train), "data.train: at least one training manifest is needed"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{source}: {msg}")
    for i, s in enumerate(cfg.data.train + cfg.data.eval):
        if not s.path:
            raise ConfigError(f"{source}: data source {i}: 'path' is required")
        if s.weight is not None and s.weight <= 0:
            raise ConfigError(f"{source}: data source {s.path}: weight must be > 0")
        if s.task == "target" and not s.instruction:
            raise ConfigError(f"{source}: data source {s.path}: task 'target' needs an 'instruction'")
    if (cfg.train.objective == "sft") != all(s.task == "alpaca" for s in cfg.data.train):
        raise ConfigError(f"{source}: objective 'sft' goes with task 'alpaca' sources only (and vice versa)")
