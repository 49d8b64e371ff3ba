"""BlspModel on the bundled real models: whisper-base + SmolLM2-135M-Instruct, untrained adapter."""

from __future__ import annotations

import pytest
import torch

from blsp.data.audio import load_audio
from blsp.instructions import CONTINUATION, REPETITION
from blsp.models.prompt import make_conversation

pytestmark = pytest.mark.slow


def test_real_model_forward_generate_and_gradients(real_model, speech_wav):
    model = real_model
    assert model.config.encoder_dim == 512 and model.config.llm_dim == 576
    clips = [
        load_audio(speech_wav("the weather is lovely today")),
        load_audio(speech_wav("please bring me a cup of coffee with milk and sugar")),
    ]
    examples = [
        {
            "conversation": make_conversation(CONTINUATION, audio=clips[0]),
            "response": "Sunny days are the best.",
        },
        {"conversation": make_conversation(REPETITION, audio=clips[1]), "response": "Bring me a coffee."},
    ]
    batch = model.collate(examples)
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("adapter.") for n in grads)
    assert all(not p.requires_grad for p in model.llm.parameters())
    assert all(not p.requires_grad for p in model.encoder.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()

    # generate on speech and on text in one batch; the text path must answer sensibly
    text_ex = {"conversation": make_conversation(REPETITION, transcript="the weather is lovely today")}
    outs = model.generate([examples[0], text_ex], max_new_tokens=16)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert "weather" in outs[1].lower()
    # an adapter checkpoint is a few MB, not the LLM
    assert model.num_parameters(trainable_only=True) < 10_000_000
