"""GGUF file -> ordinary Hugging Face folder (safetensors weights, config, tokenizer).

transformers loads a GGUF file (``from_pretrained(dir, gguf_file=...)``), dequantising it in
Python, which takes tens of seconds; ``save_pretrained`` then refuses the result ("quantized with
gguf and is not serializable"). Writing the state dict with safetensors, the config without its
``quantization_config`` and the tokenizer gives a folder that loads in well under a second with
the same logits. ``blsp.models.hub`` caches that folder.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from blsp.errors import ModelLoadError

log = logging.getLogger(__name__)

CONVERTER_VERSION = "1"


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


def check_gguf_header(path: Path) -> None:
    """ModelLoadError naming ``path`` unless it starts like a GGUF file (magic, version, counts)."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(24)
        size = path.stat().st_size
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read GGUF file ({e.strerror or e})") from e
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path}: not a valid GGUF file (it starts with {head[:4]!r}, not the magic {GGUF_MAGIC!r})"
        )
    if len(head) < 24:
        raise ModelLoadError(
            f"{path}: not a valid GGUF file: truncated ({size} bytes, shorter than its 24-byte header)"
        )
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (only {GGUF_VERSIONS})")
    if n_tensors > size or n_kv > size:  # every entry takes bytes: a corrupt header
        raise ModelLoadError(
            f"{path}: not a valid GGUF file: truncated or corrupt header ({n_tensors} tensors and "
            f"{n_kv} metadata entries in {size} bytes)"
        )


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file; ModelLoadError if the file is not a readable GGUF."""
    from gguf import GGUFReader

    check_gguf_header(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError on a bad or truncated file
        raise ModelLoadError(
            f"{path}: not a valid GGUF file: truncated or corrupt ({path.stat().st_size} bytes; "
            f"{type(e).__name__}: {e})"
        ) from e
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path}: GGUF file has no general.architecture field")
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (IndexError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a valid GGUF file: unreadable general.architecture ({e})") from e


def join_parts(parts: Sequence[Path], dest: Path) -> Path:
    """Concatenate a GGUF split into byte chunks (``x.gguf.part00``, ...) into ``dest``."""
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    return dest


def convert_gguf(files: Sequence[Path], out_dir: Path) -> None:
    """Write a Hugging Face folder for the GGUF model in ``files`` (one file, or its byte chunks in order)."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f}: GGUF file not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(files) == 1:
        path = files[0]
    else:
        name = files[0].name.split(".gguf")[0] + ".gguf"
        path = join_parts(files, out_dir / name)
    try:
        arch = gguf_architecture(path)
        log.info("loading GGUF %s (architecture %s); dequantising takes a while, once", path, arch)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # transformers raises ValueError / KeyError / OSError here
            if "not supported" in str(e):
                raise ModelLoadError(
                    f"{path}: GGUF architecture '{arch}' is not supported by transformers' GGUF loader"
                ) from e
            raise ModelLoadError(
                f"{path}: cannot load GGUF (architecture '{arch}'): {type(e).__name__}: {e}"
            ) from e
    finally:
        if path.parent == out_dir:
            path.unlink(missing_ok=True)

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = "float32"
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})  # dedups tied weights
    config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s -> %s", path, out_dir)
