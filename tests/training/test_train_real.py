"""The default model (whisper-base + SmolLM2-135M-Instruct) trains on real speech and reloads."""

from __future__ import annotations

import json

import pytest
import torch

from blsp.instructions import REPETITION
from blsp.training.config import config_from_dict
from blsp.training.trainer import train

SENTENCES = [
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "it is easy to tell the depth of a well",
]


@pytest.mark.slow
def test_real_model_loss_falls_and_the_adapter_reloads(real_model, speech_wav, tmp_path):
    from blsp.data.audio import audio_info
    from blsp.models.modeling_blsp import BlspModel
    from blsp.models.prompt import make_conversation

    lines = []
    for i, text in enumerate(SENTENCES):
        wav = speech_wav(text)
        lines.append(
            {
                "id": f"rep-{i}",
                "audio": str(wav),
                "text": text,
                "duration": audio_info(wav).duration,
                "behavior": "repetition",
                "instruction": REPETITION,
                "response": text,
            }
        )
    manifest = tmp_path / "behaviors.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rec = {
        "name": "real",
        "data": {"train": [{"path": str(manifest)}], "encoder_cache": str(tmp_path / "cache")},
        "train": {
            "lr": 5e-4,  # the shipped recipe's rate
            "warmup_steps": 0,
            "scheduler": "constant",
            "global_batch_size": 3,
            "micro_batch_size": 3,
            "max_steps": 5,
            "seed": 0,
            # exact arithmetic for a 5-step check on 3 clips; bf16 agreement is tested on its own
            "precision": "fp32",
        },
        "run": {
            "output_dir": str(tmp_path / "run"),
            "save_every": 5,
            "log_every": 1,
            "progress": False,
            "tensorboard": False,
        },
    }
    original = {k: v.clone() for k, v in real_model.adapter.state_dict().items()}
    try:
        summary = train(config_from_dict(rec), model=real_model)
        losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
        assert len(losses) == 5 and losses[-1] < 0.85 * losses[0], losses
        assert max(losses[1:]) < losses[0], losses
        assert summary["encoder_cache"] == {"encoded": 3, "served": 12, "writable": True}  # each clip once
        real_model.train(False)
        ex = [{"conversation": make_conversation(REPETITION, audio=str(speech_wav(SENTENCES[0])))}]
        trained = real_model.generate(ex, max_new_tokens=12)
    finally:
        real_model.adapter.load_state_dict(original)
        real_model.train(False)
    again = BlspModel.from_pretrained(tmp_path / "run" / "final", device="cpu")
    assert again.config.encoder == "whisper-base" and again.config.llm == "smollm2-135m-instruct"
    out = again.generate(ex, max_new_tokens=12)
    assert out == trained and isinstance(out[0], str) and out[0].strip()
    for k, v in again.adapter.state_dict().items():
        assert not torch.equal(v, original[k])  # the reloaded adapter is the trained one
