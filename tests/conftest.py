"""Shared fixtures: tiny random models for logic tests, the bundled real models, real speech."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a model hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "please repeat the following words",
    "continue the following text in a coherent and engaging style with less than forty words",
    "the quick brown fox jumps over the lazy dog",
    "a man in an orange hat is looking at something",
    "translate the following english text into german text",
    "classify the emotional tone of the text as positive negative or neutral",
]


def build_tiny_tokenizer(path: Path, chat_template: str | None = CHATML):
    """A small byte-level BPE tokenizer with ChatML special tokens, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token=None
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Whisper and Llama folders in the ordinary Hugging Face layout."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    whisper_dir = root / "whisper"
    wcfg = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        decoder_layers=1,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    WhisperForConditionalGeneration(wcfg).save_pretrained(whisper_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(whisper_dir)

    llm_dir = root / "llm"
    tok = build_tiny_tokenizer(llm_dir)
    lcfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(lcfg).save_pretrained(llm_dir)

    paper_dir = root / "llm_paper"  # the same LLM, tokenizer without a chat template
    shutil.copytree(llm_dir, paper_dir)
    build_tiny_tokenizer(paper_dir, chat_template=None)
    cfg = paper_dir / "tokenizer_config.json"
    if cfg.exists():
        import json

        data = json.loads(cfg.read_text())
        data.pop("chat_template", None)
        cfg.write_text(json.dumps(data))
    (paper_dir / "chat_template.jinja").unlink(missing_ok=True)
    return {"whisper": whisper_dir, "llm": llm_dir, "llm_paper": paper_dir}


@pytest.fixture
def tiny_blsp_config(tiny_dirs):
    from blsp.models.configuration_blsp import BlspConfig

    return BlspConfig(
        encoder=str(tiny_dirs["whisper"]),
        llm=str(tiny_dirs["llm"]),
        adapter_bottleneck_dim=16,
    )


@pytest.fixture
def tiny_model(tiny_blsp_config):
    import torch

    from blsp.models.modeling_blsp import BlspModel

    torch.manual_seed(0)
    return BlspModel.from_config(tiny_blsp_config, device="cpu")


@pytest.fixture(scope="session")
def real_model():
    """whisper-base + smollm2-135m-instruct with an untrained adapter (loaded once per session)."""
    import torch

    from blsp.models.configuration_blsp import BlspConfig
    from blsp.models.modeling_blsp import BlspModel

    torch.manual_seed(0)
    return BlspModel.from_config(BlspConfig(), device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory):
    """``speech_wav(text, voice="en-us") -> Path``: real speech from espeak-ng (cached per session)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make install installs it)")
    root = tmp_path_factory.mktemp("speech")

    def make(text: str, voice: str = "en-us", speed: int = 150) -> Path:
        key = hashlib.sha1(f"{voice}|{speed}|{text}".encode()).hexdigest()[:12]
        out = root / f"{key}.wav"
        if not out.exists():
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text], check=True)
        return out

    return make
