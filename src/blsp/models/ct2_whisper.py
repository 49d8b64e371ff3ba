"""CTranslate2 Whisper folder -> transformers Whisper folder (encoder, decoder, processor).

A CTranslate2 ``model.bin`` is a flat list of named little-endian arrays::

    uint32 version, string spec_name, uint32 revision, uint32 n_variables,
    n_variables x (string name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 n_bytes, bytes),
    uint32 n_aliases, n_aliases x (string alias, string target)

where a string is a uint16 length (counting a trailing NUL) followed by its bytes. Whisper's
variables map one to one onto ``WhisperForConditionalGeneration`` except the fused projections:
self-attention ``linear_0`` is q,k,v stacked; cross-attention ``linear_0`` is q and ``linear_1`` is
k,v stacked. Whisper's k projection has no bias (CTranslate2 stores zeros there). The model.bin may
be split in parts (pip packages have a size limit); ``read_ct2_model`` reads their concatenation.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from blsp.errors import ModelLoadError

log = logging.getLogger(__name__)

# CTranslate2 dtype codes -> numpy dtype used to read the bytes (bfloat16 is read as int16 and viewed).
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.int16}
CT2_BFLOAT16 = 5

# Bumping this invalidates every cached conversion (it is part of the cache key).
CONVERTER_VERSION = "1"


# ----------------------------------------------------------------------------------------------
# model.bin parsing


class _Reader:
    """Bounds-checked little-endian reader over the bytes of one (possibly joined) model.bin."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.source, self.pos = memoryview(data), source, 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise ModelLoadError(
                f"{self.source}: truncated or corrupt model.bin: {what} needs {n} bytes at offset "
                f"{self.pos}, but the file has {len(self.data)} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("H", what)
        return bytes(self.take(n, what)).rstrip(b"\0").decode("utf-8", errors="replace")


def read_ct2_model(paths: Sequence[Path]) -> tuple[str, dict[str, torch.Tensor]]:
    """Read the CTranslate2 model stored in ``paths`` (concatenated in order).

    Returns ``(spec_name, {variable name: tensor})``; aliases are resolved to their target tensor.
    """
    source = " + ".join(str(p) for p in paths)
    try:
        data = b"".join(Path(p).read_bytes() for p in paths)
    except OSError as e:
        raise ModelLoadError(f"{source}: cannot read model file ({e.strerror or e})") from e
    r = _Reader(data, source)
    version = r.scalar("I", "format version")
    if not 1 <= version <= 100:
        raise ModelLoadError(f"{source}: not a CTranslate2 model.bin (format version {version})")
    spec = r.string("spec name") if version >= 2 else ""
    if version >= 2:
        r.scalar("I", "spec revision")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(r.scalar("I", "variable count")):
        name = r.string("variable name")
        rank = r.scalar("B", f"rank of {name}")
        shape = [r.scalar("I", f"shape of {name}") for _ in range(rank)]
        code = r.scalar("B", f"dtype of {name}")
        if code not in CT2_DTYPES:
            raise ModelLoadError(f"{source}: variable {name} has unknown dtype code {code}")
        nbytes = r.scalar("I", f"size of {name}")
        dtype = np.dtype(CT2_DTYPES[code])
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected:
            raise ModelLoadError(
                f"{source}: corrupt model.bin: variable {name} of shape {shape} ({dtype}) needs "
                f"{expected} bytes, the file says {nbytes}"
            )
        raw = r.take(nbytes, f"variable {name}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        tensor = torch.from_numpy(array)
        variables[name] = tensor.view(torch.bfloat16) if code == CT2_BFLOAT16 else tensor
    if r.pos < len(data):  # aliases (tied weights), absent in very old files
        for _ in range(r.scalar("I", "alias count")):
            alias, target = r.string("alias"), r.string("alias target")
            if target not in variables:
                raise ModelLoadError(
                    f"{source}: corrupt model.bin: alias {alias} names no variable ({target})"
                )
            variables[alias] = variables[target]
    return spec, variables


# ----------------------------------------------------------------------------------------------
# CTranslate2 names -> transformers names


def _layer_count(v: dict[str, torch.Tensor], stack: str) -> int:
    found = {int(m.group(1)) for k in v if (m := re.match(rf"{stack}/layer_(\d+)/", k))}
    return max(found) + 1 if found else 0


def _split(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [c.clone() for c in torch.chunk(t, n, dim=0)]


def whisper_state_dict(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` state-dict entries."""
    sd: dict[str, torch.Tensor] = {}

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/weight"], v[f"{src}/bias"]

    def attention(dst: str, src: str, fused: list[str]) -> None:
        # ``fused`` lists (in order) the ct2 linears and the projections stacked in each, e.g. "qkv".
        for i, group in enumerate(fused):
            weights = _split(v[f"{src}/linear_{i}/weight"], len(group))
            biases = _split(v[f"{src}/linear_{i}/bias"], len(group))
            for proj, w, b in zip(group, weights, biases, strict=True):
                sd[f"{dst}.{proj}_proj.weight"] = w
                if proj != "k":  # whisper's k projection has no bias
                    sd[f"{dst}.{proj}_proj.bias"] = b
        linear(f"{dst}.out_proj", f"{src}/linear_{len(fused)}")

    def ffn(dst: str, src: str) -> None:
        norm(f"{dst}.final_layer_norm", f"{src}/layer_norm")
        linear(f"{dst}.fc1", f"{src}/linear_0")
        linear(f"{dst}.fc2", f"{src}/linear_1")

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    sd[f"{enc}.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    for i in range(_layer_count(v, "encoder")):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        attention(f"{dst}.self_attn", f"{src}/self_attention", ["qkv"])
        ffn(dst, f"{src}/ffn")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")

    sd[f"{dec}.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd[f"{dec}.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    for i in range(_layer_count(v, "decoder")):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        attention(f"{dst}.self_attn", f"{src}/self_attention", ["qkv"])
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        attention(f"{dst}.encoder_attn", f"{src}/attention", ["q", "kv"])
        ffn(dst, f"{src}/ffn")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    return sd


# ----------------------------------------------------------------------------------------------
# config, tokenizer, processor


def _num_heads(v: dict[str, torch.Tensor], stack: str, d_model: int) -> int:
    t = v.get(f"{stack}/num_heads")
    return int(t.item()) if t is not None else d_model // 64  # every Whisper size uses 64-dim heads


def whisper_config_kwargs(v: dict[str, torch.Tensor]) -> dict:
    """WhisperConfig sizes derived from the weight shapes."""
    d_model, n_mels = v["encoder/conv1/weight"].shape[:2]
    return dict(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_layer_count(v, "encoder"),
        decoder_layers=_layer_count(v, "decoder"),
        encoder_attention_heads=_num_heads(v, "encoder", d_model),
        decoder_attention_heads=_num_heads(v, "decoder", d_model),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )


def build_tokenizer(tokenizer_json: Path, vocab_size: int):
    """A ``WhisperTokenizerFast`` from a ``tokenizer.json``, with the 1501 timestamp tokens added if missing."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast(tokenizer_file=str(tokenizer_json))
    tok.pad_token = tok.eos_token
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    missing = [t for t in timestamps if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in missing])
    if len(tok) > vocab_size:
        raise ModelLoadError(
            f"{tokenizer_json}: {len(tok)} tokens but the model has only {vocab_size} embeddings"
        )
    return tok


def build_generation_config(tok, ct2_config: dict, is_multilingual: bool, max_length: int):
    """The generation settings ``WhisperForConditionalGeneration.generate`` expects (as in openai/whisper-*)."""
    from transformers import GenerationConfig

    ids = tok.convert_tokens_to_ids
    eot, sot, no_ts = ids("<|endoftext|>"), ids("<|startoftranscript|>"), ids("<|notimestamps|>")
    gen = dict(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=max_length,
        no_timestamps_token_id=no_ts,
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=is_multilingual,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads") or []],
    )
    if is_multilingual:
        lang_ids = ct2_config.get("lang_ids") or range(sot + 1, ids("<|translate|>"))
        gen["lang_to_id"] = {tok.convert_ids_to_tokens(i): i for i in lang_ids}
        gen["task_to_id"] = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
        # a plain generate() detects the language and transcribes (generate adds <|notimestamps|> itself)
        gen["forced_decoder_ids"] = [[1, None], [2, ids("<|transcribe|>")]]
    return GenerationConfig(**gen)


# ----------------------------------------------------------------------------------------------
# conversion


def find_model_files(ct2_dir: Path) -> list[Path]:
    """``model.bin``, or its parts ``model.bin.part1``, ``model.bin.part2``, ... in order."""
    if (ct2_dir / "model.bin").is_file():
        return [ct2_dir / "model.bin"]
    parts = sorted(ct2_dir.glob("model.bin.part*"), key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0))
    if not parts:
        raise ModelLoadError(f"{ct2_dir}: no model.bin (or model.bin.partN) in this CTranslate2 folder")
    return parts


def convert_ct2_whisper(model_files: Sequence[Path], meta_dir: Path, out_dir: Path) -> None:
    """Write a transformers Whisper folder to ``out_dir`` from CTranslate2 weights.

    ``model_files`` is ``model.bin`` or its parts in order; ``meta_dir`` holds ``tokenizer.json``
    (and ``config.json`` with suppress ids / alignment heads, optional).
    """
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperProcessor

    model_files = [Path(p) for p in model_files]
    for p in model_files:
        if not p.is_file():
            raise ModelLoadError(f"{p}: model file not found")
    tokenizer_json = meta_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelLoadError(f"{meta_dir}: no tokenizer.json beside the CTranslate2 model")
    ct2_config = {}
    if (meta_dir / "config.json").is_file():
        try:
            ct2_config = json.loads((meta_dir / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{meta_dir / 'config.json'}: invalid JSON ({e})") from e

    spec, variables = read_ct2_model(model_files)
    if spec != "WhisperSpec":
        raise ModelLoadError(f"{model_files[0]}: a CTranslate2 {spec or 'model'}, not a Whisper model")
    if any(k.endswith("/weight") and t.dtype == torch.int8 for k, t in variables.items()):
        raise ModelLoadError(f"{model_files[0]}: int8-quantized CTranslate2 models are not supported")
    try:
        sizes = whisper_config_kwargs(variables)
        state = whisper_state_dict(variables)
    except KeyError as e:
        raise ModelLoadError(f"{model_files[0]}: Whisper variable {e} missing from model.bin") from e
    except (ValueError, IndexError, RuntimeError, TypeError) as e:  # shapes that are not Whisper's
        raise ModelLoadError(
            f"{model_files[0]}: model.bin variables do not form a Whisper model ({type(e).__name__}: {e})"
        ) from e

    tok = build_tokenizer(tokenizer_json, sizes["vocab_size"])
    is_multilingual = sizes["vocab_size"] >= 51865  # the rule openai/whisper uses
    gen = build_generation_config(tok, ct2_config, is_multilingual, sizes["max_target_positions"])
    config = WhisperConfig(
        **sizes,
        decoder_start_token_id=gen.decoder_start_token_id,
        bos_token_id=gen.bos_token_id,
        eos_token_id=gen.eos_token_id,
        pad_token_id=gen.pad_token_id,
        suppress_tokens=gen.suppress_tokens,
        begin_suppress_tokens=gen.begin_suppress_tokens,
        architectures=["WhisperForConditionalGeneration"],
        dtype="float32",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # float32 on disk (exact for float16 sources) so that a plain from_pretrained gives a CPU-ready model;
    # copies, since CTranslate2 aliases identical tensors (e.g. all-ones layer norms) to one another
    state = {k: t.to(torch.float32, copy=True).contiguous() for k, t in state.items()}
    save_file(state, str(out_dir / "model.safetensors"), {"format": "pt"})
    config.save_pretrained(out_dir)
    gen.save_pretrained(out_dir)
    features = WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"])
    WhisperProcessor(feature_extractor=features, tokenizer=tok).save_pretrained(out_dir)
    log.info("converted %s -> %s (%d tensors)", model_files[0].parent, out_dir, len(state))
