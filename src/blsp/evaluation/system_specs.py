"""``parse_system_specs``: the systems of ``blsp eval -s [NAME=]KIND[:ARG]``.

Kinds: ``blsp:DIR``, ``asr-pretrain:DIR``, ``text``, ``whisper[:REF]``, ``ctc:DIR`` (the classes of
:mod:`blsp.evaluation.systems`) and ``endpoint:URL`` (:mod:`blsp.evaluation.endpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from blsp.errors import BlspError
from blsp.evaluation.endpoint import EndpointSystem
from blsp.evaluation.systems import (
    BlspSystem,
    CascadeSystem,
    ModelHandle,
    SharedModel,
    System,
    TextSystem,
    ctc_transcriber,
    whisper_transcriber,
)
from blsp.models.hub import DEFAULT_WHISPER


def _config_key(path: str) -> str | None:
    from blsp.models.configuration_blsp import BlspConfig
    from blsp.models.hub import resolve_adapter
    from blsp.models.modeling_blsp import config_key, is_finetuned

    try:
        folder = resolve_adapter(path)
        if is_finetuned(folder):  # its LoRA/encoder change the frozen models: never shared
            return None
        return config_key(BlspConfig.from_pretrained(str(folder)))
    except Exception:
        return None


def parse_system_specs(
    specs: Sequence[str],
    base: str | None = None,
    encoder: str | None = None,
    llm: str | None = None,
    device: str | None = None,
    share_models: bool = True,
) -> list[System]:
    """Systems from ``[NAME=]KIND[:ARG]`` specs.

    Kinds: ``blsp:DIR`` (an adapter folder; also ``asr-pretrain:DIR``), ``text`` (Text+LLM),
    ``whisper[:REF]`` (Whisper+LLM, default whisper-base), ``ctc:DIR`` (CTC+LLM). The text path of
    ``text``/``whisper``/``ctc`` uses ``base`` (an adapter folder), else the first ``blsp`` folder,
    else a model built from ``encoder``/``llm`` (the adapter does not matter on the text path).
    Adapter folders of one config share one loaded encoder and LLM unless ``share_models`` is False.
    """
    parsed: list[tuple[str | None, str, str]] = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep:
            name, rest = None, spec
        kind, _, arg = rest.partition(":")
        kind = kind.strip().lower()
        if kind not in ("blsp", "asr-pretrain", "text", "whisper", "ctc", "endpoint"):
            if Path(rest).is_dir():  # a bare adapter folder
                kind, arg = "blsp", rest
            else:
                raise BlspError(
                    f"system spec {spec!r}: unknown kind {kind!r} (expected blsp:DIR, asr-pretrain:DIR, text, "
                    "whisper[:REF], ctc:DIR, endpoint:URL)"
                )
        if kind in ("blsp", "asr-pretrain", "ctc") and not arg:
            raise BlspError(f"system spec {spec!r}: {kind} needs a folder, e.g. {kind}:runs/adapter")
        if kind == "endpoint" and not arg.startswith(("http://", "https://")):
            raise BlspError(
                f"system spec {spec!r}: endpoint needs a URL, e.g. endpoint:http://127.0.0.1:8000/v1"
            )
        parsed.append((name, kind, arg))

    handles: dict[str, ModelHandle] = {}
    shared: dict[str, SharedModel] = {}

    def handle_for(path: str) -> ModelHandle:
        key = str(Path(path).resolve())
        if key not in handles:
            cfg = _config_key(path) if share_models else None  # None: unreadable; its load says why
            sh = shared.setdefault(cfg, SharedModel()) if cfg is not None else None
            handles[key] = ModelHandle(path, device=device, shared=sh)
        return handles[key]

    base_handle: ModelHandle | None = None
    if base:
        base_handle = handle_for(base)
    else:
        first = next((a for _, k, a in parsed if k in ("blsp", "asr-pretrain")), None)
        if first:
            base_handle = handle_for(first)

    def text_handle() -> ModelHandle:
        nonlocal base_handle
        if base_handle is None:
            from blsp.models.configuration_blsp import BlspConfig

            kw = {k: v for k, v in (("encoder", encoder), ("llm", llm)) if v}
            base_handle = ModelHandle(BlspConfig(**kw), device=device)
        return base_handle

    systems: list[System] = []
    names: set[str] = set()
    for name, kind, arg in parsed:
        if kind in ("blsp", "asr-pretrain"):
            default = "ASR pretraining" if kind == "asr-pretrain" else Path(arg).name or "BLSP"
            sys_: System = BlspSystem(handle_for(arg), name=name or default)
        elif kind == "text":
            sys_ = TextSystem(text_handle(), name=name or "Text+LLM")
        elif kind == "endpoint":
            sys_ = EndpointSystem(arg, name=name or "endpoint")
        elif kind == "whisper":
            sys_ = CascadeSystem(
                whisper_transcriber(arg or DEFAULT_WHISPER, device or "cpu"),
                text_handle(),
                name=name or "Whisper+LLM",
            )
        else:
            sys_ = CascadeSystem(ctc_transcriber(arg, device), text_handle(), name=name or "CTC+LLM")
        if sys_.name in names:
            raise BlspError(f"two systems are named {sys_.name!r}; name them with NAME=KIND:ARG")
        names.add(sys_.name)
        systems.append(sys_)
    return systems
