"""What makes an adapter learn the speech fast: the shared-head forward, bf16, the embedding-CTC warm
start and the matched/shuffled content check, on the tiny models."""

from __future__ import annotations

import pytest
import torch

from blsp.training.data import Example, shuffled_speech
from blsp.training.objectives import response_logits

from .test_objectives import _fit, _task


def test_shared_head_gives_the_same_logits_and_gradients(tiny_recipe):
    task, examples = _task(tiny_recipe, train={"objective": "ce"})
    model = task.model
    rows = [e for e in examples if e.instruction == examples[0].instruction][:3]
    assert len(rows) == 3
    batch = task.collate(rows)
    student = task.inputs(batch)["student"]
    first_speech = int(student["speech_mask"].float().argmax(1).min())
    n = model.shared_head_length(
        student["input_ids"],
        student["attention_mask"],
        student["speech_mask"],
        student["input_ids"].shape[1] - 1,
    )
    assert 8 <= n <= first_speech  # the path under test runs, and stops before the speech

    results = []
    for share in (False, True):
        model.adapter.zero_grad(set_to_none=True)
        logits, targets = response_logits(model, student, share_head=share)
        torch.nn.functional.cross_entropy(logits, targets).backward()
        results.append(
            (logits.detach(), targets, {k: p.grad.clone() for k, p in model.adapter.named_parameters()})
        )
    (l0, t0, g0), (l1, t1, g1) = results
    assert torch.equal(t0, t1)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


def test_shared_head_is_skipped_when_the_llm_trains(tiny_recipe):
    task, examples = _task(tiny_recipe, train={"objective": "ce"})
    student = task.inputs(task.collate(examples[:2]))["student"]
    calls = []
    task.model._head_cache = lambda *a: calls.append(a)  # would be called for a shared head
    next(task.model.llm.parameters()).requires_grad_(True)
    response_logits(task.model, student, share_head=True)
    assert calls == []


def test_bf16_autocast_loss_agrees_with_fp32(tiny_recipe):
    from blsp.utils.torch import autocast_dtype

    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    task, examples = _task(tiny_recipe, train={"objective": "ce"})
    inputs = task.inputs(task.collate(examples[:4]))
    with torch.no_grad():
        fp32 = task.loss(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = task.loss(**inputs)
    per_token = [float(o["loss_sum"] / o["count"]) for o in (fp32, bf16)]
    assert per_token[1] == pytest.approx(per_token[0], rel=0.02)  # bf16 keeps 8 bits of mantissa


def test_shuffled_speech_swaps_every_clip_and_keeps_targets():
    ex = [
        Example(id=str(i), instruction="i", response=f"r{i}", audio=f"a{i}.wav", duration=i) for i in range(4)
    ]
    ex.insert(2, Example(id="text", instruction="i", response="t"))
    out = shuffled_speech(ex)
    assert [e.response for e in out] == [e.response for e in ex]
    assert out[2] == ex[2]  # a text-only example stays as it is
    speech = [(a, b) for a, b in zip(ex, out, strict=True) if a.audio]
    assert all(a.audio != b.audio and b.duration == float(b.audio[1]) for a, b in speech)
    assert sorted(b.audio for _, b in speech) == sorted(a.audio for a, _ in speech)
    assert shuffled_speech(ex[:1]) is None


def test_embedding_ctc_warm_start_learns_reloads_and_transcribes(tiny_recipe, tmp_path):
    from blsp.models.adapter import EmbeddingCtcHead
    from blsp.models.ctc import CtcTranscriber
    from blsp.models.modeling_blsp import BlspModel
    from blsp.training.trainer import make_optimizer

    task, examples = _task(tiny_recipe, train={"objective": "ctc", "lr": 2e-2}, ctc={"vocab": "embeddings"})
    task.prepare(examples)
    head = task.model.extra["ctc"]
    assert isinstance(head, EmbeddingCtcHead)
    tok = task.model.tokenizer
    wanted = {t for e in examples for t in tok(e.transcript, add_special_tokens=False)["input_ids"]}
    assert set(head.token_ids.tolist()) == wanted  # the labels are the transcripts' own tokens
    trainable = {n for n, _ in task.trainable()}
    assert {"model.extra.ctc.blank", "model.extra.ctc.log_scale"} <= trainable
    assert not any("embed_tokens" in n for n in trainable)  # the LLM's embeddings stay frozen
    assert make_optimizer(task, task._cfg)
    import soundfile as sf

    from .conftest import SR, _clip

    # a clip long enough for its tokens at one label a frame (the tiny tokenizer splits words finely)
    sf.write(tmp_path / "long.wav", _clip(4.0, 7), SR)
    text = examples[0].transcript.split()[0]
    ex = [
        Example(
            id="long",
            instruction="",
            response=text,
            audio=str(tmp_path / "long.wav"),
            duration=4.0,
            transcript=text,
        )
    ]
    assert task.collate(ex)["count"] >= 2
    losses = _fit(task, ex, steps=120)
    assert losses[-1] < 0.1 * losses[0], losses[::10]

    task.model.save_pretrained(tmp_path / "ctc")
    again = CtcTranscriber.from_pretrained(tmp_path / "ctc", device="cpu")
    texts = again.transcribe([e.audio for e in ex])
    assert texts == [e.transcript for e in ex]  # a memorised clip
    # as a warm start only the adapter carries over into behavior alignment
    plain = BlspModel.from_pretrained(tmp_path / "ctc", device="cpu")
    for k, v in plain.adapter.state_dict().items():
        torch.testing.assert_close(v, task.model.adapter.state_dict()[k])


def test_embedding_ctc_needs_one_label_a_frame(tiny_recipe):
    from blsp.errors import ConfigError

    task, examples = _task(
        tiny_recipe, train={"objective": "ctc"}, ctc={"vocab": "embeddings", "upsample": 2}
    )
    with pytest.raises(ConfigError, match="upsample 1"):
        task.prepare(examples)


def test_adapter_starts_at_the_scale_of_the_token_embeddings(tiny_model):
    emb = tiny_model.llm.get_input_embeddings().weight.detach()
    rms = float(emb.pow(2).mean().sqrt())
    assert torch.allclose(
        tiny_model.adapter.norm.weight, torch.full_like(tiny_model.adapter.norm.weight, rms)
    )
