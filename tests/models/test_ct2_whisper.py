"""CTranslate2 Whisper -> transformers: the model.bin parser, the name mapping, the real whisper-base encoder."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from blsp.errors import ModelLoadError
from blsp.models.ct2_whisper import convert_ct2_whisper, read_ct2_model
from blsp.models.hub import ALIASES, load_whisper

CT2_CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}


def write_ct2(path: Path, variables: dict[str, np.ndarray], spec: str = "WhisperSpec", aliases=()) -> None:
    """Write a CTranslate2 model.bin (format version 6) by the documented layout."""

    def string(s: str) -> bytes:
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    out = struct.pack("<I", 6) + string(spec) + struct.pack("<II", 3, len(variables))
    for name, a in variables.items():
        out += string(name) + struct.pack("<B", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
        out += struct.pack("<BI", CT2_CODES[a.dtype], a.nbytes) + a.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases)
    path.write_bytes(out)


def tiny_en_dir() -> Path:
    files = ALIASES["whisper-tiny.en"].files()
    if files is None:
        pytest.skip(ALIASES["whisper-tiny.en"].install_command())
    return files[0].parent


def test_read_ct2_model_joins_parts_and_resolves_aliases(tmp_path):
    variables = {
        "decoder/embeddings/weight": np.arange(12, dtype=np.float16).reshape(4, 3),
        "encoder/num_heads": np.array(8, dtype=np.int16),
        "encoder/conv1/bias": np.linspace(-1, 1, 5, dtype=np.float32),
    }
    write_ct2(
        tmp_path / "model.bin",
        variables,
        aliases=[("decoder/projection/weight", "decoder/embeddings/weight")],
    )
    data = (tmp_path / "model.bin").read_bytes()
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(data[:50])  # the cut falls inside a variable name
    parts[1].write_bytes(data[50:])

    spec, got = read_ct2_model(parts)

    assert spec == "WhisperSpec"
    for name, a in variables.items():
        assert got[name].dtype == torch.from_numpy(a).dtype
        np.testing.assert_array_equal(got[name].numpy(), a)
    assert got["decoder/projection/weight"] is got["decoder/embeddings/weight"]


def test_truncated_model_bin_names_file_and_problem(tmp_path):
    write_ct2(tmp_path / "model.bin", {"encoder/conv1/weight": np.ones((8, 4, 3), np.float16)})
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.bin.*truncated.*encoder/conv1/weight"):
        read_ct2_model([tmp_path / "model.bin"])


def test_not_a_ct2_file_and_wrong_spec(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelLoadError, match="not a CTranslate2 model"):
        read_ct2_model([tmp_path / "model.bin"])

    shutil.copy(tiny_en_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    write_ct2(tmp_path / "model.bin", {"x": np.ones(2, np.float32)}, spec="TransformerSpec")
    with pytest.raises(ModelLoadError, match="TransformerSpec, not a Whisper model"):
        convert_ct2_whisper([tmp_path / "model.bin"], tmp_path, tmp_path / "out")


def test_matches_ctranslate2s_own_converter(tmp_path):
    """HF -> CT2 with ctranslate2's converter, back with ours: every tensor identical, logits equal."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

    tokenizer_json = tiny_en_dir() / "tokenizer.json"
    hf_dir, ct2_dir, out_dir = tmp_path / "hf", tmp_path / "ct2", tmp_path / "out"
    config = WhisperConfig(
        vocab_size=51864, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=80,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = WhisperForConditionalGeneration(config).eval()
    for name, p in reference.named_parameters():  # random biases too (HF initialises them to zero)
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    reference.save_pretrained(hf_dir)
    WhisperTokenizerFast(tokenizer_file=str(tokenizer_json)).save_pretrained(hf_dir)
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(ct2_dir), quantization="float32")
    shutil.copy(tokenizer_json, ct2_dir / "tokenizer.json")

    convert_ct2_whisper([ct2_dir / "model.bin"], ct2_dir, out_dir)
    model, processor = load_whisper(out_dir)

    expected = reference.state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    for key in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_ffn_dim"):
        assert getattr(model.config, key) == getattr(config, key)
    # English-only (51864 tokens): no language or task tokens in the decoder prompt
    assert model.generation_config.is_multilingual is False
    assert processor.tokenizer.prefix_tokens == processor.tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|notimestamps|>"]
    )
    assert processor.feature_extractor.feature_size == 80


@pytest.mark.slow
def test_whisper_base_encoder_matches_ctranslate2(whisper_base_dir, flite_wav, tmp_path):
    """The converted encoder against ctranslate2's own Whisper.encode on the same log-mel features."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from blsp.data.audio import load_audio

    files = ALIASES["whisper-base"].files()
    ct2_dir = tmp_path / "whisper-base-ct2"  # ctranslate2 needs the split model.bin joined
    ct2_dir.mkdir()
    with open(ct2_dir / "model.bin", "wb") as out:
        for part in files:
            out.write(part.read_bytes())
    meta = next(f.parent for f in files if (f.parent / "tokenizer.json").exists())
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
        if (meta / name).exists():
            shutil.copy(meta / name, ct2_dir / name)

    model, processor = load_whisper(whisper_base_dir)
    audio = load_audio(flite_wav("Speech models turn sound into words."))
    features = processor.feature_extractor([audio], sampling_rate=16000, return_tensors="np").input_features
    reference = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(features.astype(np.float32))))
    with torch.inference_mode():
        got = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()

    assert got.shape == expected.shape == (1, 1500, 512)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    print(f"whisper-base encoder relative error vs ctranslate2: {rel:.2e}")
    assert rel < 1e-4

    # multilingual: <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
    assert model.generation_config.is_multilingual is True
    prompt = processor.get_decoder_prompt_ids(language="en", task="transcribe")
    assert [t for _, t in prompt] == processor.tokenizer.convert_tokens_to_ids(
        ["<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    )


def _whisper_base_parts() -> list[Path]:
    files = ALIASES["whisper-base"].files()
    if files is None:
        pytest.skip(ALIASES["whisper-base"].install_command())
    return files


def test_truncated_copies_of_whisper_base_name_the_file_and_the_cut(tmp_path, monkeypatch):
    from blsp.models.hub import resolve

    parts = _whisper_base_parts()
    meta = next(f.parent for f in parts if (f.parent / "tokenizer.json").is_file())
    shutil.copy(meta / "tokenizer.json", tmp_path / "tokenizer.json")
    first, second = parts[0].read_bytes(), parts[1].read_bytes()
    cut = tmp_path / "model.bin.part2"
    cuts = {  # where the file ends: (its bytes, the files read)
        "in the spec name": (first[:9], [cut]),
        "in a variable": (first[: len(first) // 3], [cut]),
        "in the aliases": (second[:-7], [parts[0], cut]),  # the joined file's last bytes missing
    }
    for where, (data, files) in cuts.items():
        cut.write_bytes(data)
        with pytest.raises(ModelLoadError) as e:
            convert_ct2_whisper(files, tmp_path, tmp_path / "out")
        msg = str(e.value)
        assert str(cut) in msg and "truncated or corrupt model.bin" in msg, (where, msg)
    # the second package missing: the first part alone ends inside a variable
    with pytest.raises(ModelLoadError, match=re.escape(str(parts[0])) + ": truncated or corrupt model.bin"):
        convert_ct2_whisper([parts[0]], meta, tmp_path / "out")
    # through a model reference: a CT2 folder with a truncated model.bin, nothing left in the cache
    monkeypatch.setenv("BLSP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ct2"
    folder.mkdir()
    shutil.copy(meta / "tokenizer.json", folder / "tokenizer.json")
    (folder / "model.bin").write_bytes(first[:4096])
    with pytest.raises(ModelLoadError, match=re.escape(str(folder / "model.bin")) + ": truncated"):
        resolve(str(folder), "whisper")
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name != ".lock"]


def test_wrong_magic_garbage_and_inconsistent_fields_are_model_load_errors(tmp_path):
    shutil.copy(tiny_en_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    path = tmp_path / "model.bin"
    header = _whisper_base_parts()[0].read_bytes()[:4096]
    cases = {
        "wrong version word": (struct.pack("<I", 0xDEADBEEF) + header[4:], "not a CTranslate2 model.bin"),
        "garbage": (np.random.default_rng(0).bytes(100_000), "model.bin"),
        "empty": (b"", "truncated or corrupt model.bin: format version"),
    }
    # a size field that disagrees with the shape
    write_ct2(path, {"encoder/conv1/weight": np.ones((8, 4, 3), np.float32)})
    good = path.read_bytes()
    off = 4 + 2 + len("WhisperSpec\0") + 8 + 2 + len("encoder/conv1/weight\0") + 1 + 12 + 1
    assert struct.unpack("<I", good[off : off + 4])[0] == 8 * 4 * 3 * 4
    cases["size field"] = (
        good[:off] + struct.pack("<I", 100) + good[off + 4 :],
        "needs 384 bytes, the file says 100",
    )
    write_ct2(path, {"x": np.ones(2, np.float32)}, aliases=[("y", "no/such/variable")])
    cases["alias"] = (path.read_bytes(), "alias y names no variable")
    write_ct2(path, {"encoder/conv1/weight": np.ones(8, np.float32)})  # 1-D: not Whisper's conv
    cases["shape"] = (path.read_bytes(), "variables do not form a Whisper model")
    for what, (data, expected) in cases.items():
        path.write_bytes(data)
        with pytest.raises(ModelLoadError) as e:
            convert_ct2_whisper([path], tmp_path, tmp_path / "out")
        assert str(e.value).startswith(f"{path}: ") and expected in str(e.value), (what, str(e.value))
