"""Each training mode on the tiny model: one step runs, the loss is finite and falls on a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch

from blsp.training.config import config_from_dict
from blsp.training.data import load_examples
from blsp.training.objectives import kl_sum
from blsp.training.setups import build_setup
from blsp.training.trainer import make_optimizer


def _fit(task, examples, steps: int = 6) -> list[float]:
    opt = make_optimizer(task, task_cfg(task))
    batch = task.collate(examples)
    assert batch["count"] > 0 and not batch["skipped"]
    losses = []
    for _ in range(steps):
        task.train_mode(True)
        out = task.loss(**task.inputs(batch))
        loss = out["loss_sum"] / out["count"]
        assert math.isfinite(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def task_cfg(task):
    return task._cfg


def _task(recipe, **over):
    cfg = config_from_dict(recipe(**over))
    torch.manual_seed(0)
    task = build_setup(cfg, torch.device("cpu"))
    task._cfg = cfg
    if hasattr(task, "model"):  # a random tiny LLM is near uniform: sharpen it so speech input matters
        with torch.no_grad():
            task.model.llm.lm_head.weight.mul_(20.0)
    examples = [e for s in load_examples(cfg.data.train, cfg.data, 0, task.needs_transcript) for e in s]
    return task, examples


@pytest.mark.parametrize(
    "objective,source",
    [("ce", "behavior"), ("kl", "behavior"), ("ce+kl", "behavior"), ("ce", "asr")],
)
def test_lm_objectives_fall_on_a_fixed_batch(tiny_recipe, tiny_manifests, objective, source):
    task, examples = _task(
        tiny_recipe,
        train={"objective": objective, "lr": 3e-3},
        data={"train": [{"path": str(tiny_manifests["train"]), "task": source}]},
    )
    frozen = [p for n, p in task.model.named_parameters() if not n.startswith("adapter.")]
    assert frozen and not any(p.requires_grad for p in frozen)  # no grads for frozen weights
    before = {n: p.detach().clone() for n, p in task.model.llm.named_parameters()}
    losses = _fit(task, examples[:4])
    print(objective, source, losses)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert all(torch.equal(p, before[n]) for n, p in task.model.llm.named_parameters())
    assert all(p.grad is None for p in frozen)


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    torch.manual_seed(0)
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    assert float(kl_sum(a, a, 2.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(kl_sum(a, b, 2.0)) > 0
    # KL(teacher || student): the teacher's distribution weights the log ratio
    p, q = torch.log_softmax(b / 2, -1), torch.log_softmax(a / 2, -1)
    assert float(kl_sum(a, b, 2.0)) == pytest.approx(float(4 * (p.exp() * (p - q)).sum()), rel=1e-5)


def test_kl_teacher_is_the_text_path_of_the_same_prompt(tiny_recipe):
    task, examples = _task(tiny_recipe, train={"objective": "kl"})
    batch = task.collate(examples[:3])
    s, t = batch["student"], batch["teacher"]
    assert not t["speech_mask"].any() and "input_features" not in t
    for i in range(3):  # the same response tokens on both paths
        sl, tl = s["labels"][i], t["labels"][i]
        assert sl[sl != -100].tolist() == tl[tl != -100].tolist()


def test_ctc_learns_and_transcribes_after_reload(tiny_recipe, tmp_path):
    from blsp.models.ctc import CtcTranscriber

    task, examples = _task(tiny_recipe, train={"objective": "ctc", "lr": 2e-2}, ctc={"upsample": 2})
    assert "ctc" in task.model.extra and task.model.extra["ctc"].weight.requires_grad
    ex = [e for e in examples if e.duration > 1.0][:1]
    losses = _fit(task, ex, steps=120)
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    task.model.save_pretrained(tmp_path / "ctc")
    again = CtcTranscriber.from_pretrained(tmp_path / "ctc", device="cpu")
    texts = again.transcribe([e.audio for e in ex])
    assert texts == CtcTranscriber(task.model).transcribe([e.audio for e in ex])
    assert texts == [e.transcript for e in ex]  # a memorised clip


def test_ctc_vocabularies():
    from blsp.models.ctc import CtcVocab, greedy_decode

    v = CtcVocab("chars")
    ids = v.encode("Hello, World's 2!")
    assert v.decode(ids) == "hello world's 2" and v.blank == 0
    lp = torch.full((1, 6, v.size), -10.0)
    for t, k in enumerate([ids[0], ids[0], v.blank, ids[1], ids[1], ids[2]]):
        lp[0, t, k] = 0.0
    assert greedy_decode(lp, torch.tensor([6]), v.blank) == [ids[:3]]


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_recipe):
    grads, calls = [], []
    for ckpt in (False, True):
        task, examples = _task(tiny_recipe, model={**tiny_recipe()["model"], "gradient_checkpointing": ckpt})
        n = [0]
        mlp = task.model.llm.model.layers[0].mlp
        # a pre-hook: recomputation stops early once the tensors backward needs are back
        mlp.register_forward_pre_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
        task.train_mode(True)
        batch = task.collate(examples[:2])
        out = task.loss(**task.inputs(batch))
        (out["loss_sum"] / out["count"]).backward()
        calls.append(n[0])
        grads.append({k: p.grad.clone() for k, p in task.trainable()})
        assert not task.model.llm.model.layers[0].mlp.training  # no dropout switched on
    assert calls == [1, 2]  # the checkpointed layer ran again in backward
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_behavior_lines_generated_from_another_prompt_are_reported(tiny_recipe, caplog):
    from dataclasses import replace

    from blsp.models.prompt import make_conversation, prompt_fingerprint

    task, examples = _task(tiny_recipe)
    a, b = examples[0], examples[1]
    same = prompt_fingerprint(
        task.model.prompt.text_prompt(make_conversation(a.instruction, transcript=a.transcript))
    )
    with caplog.at_level("WARNING"):
        task.check_examples([replace(a, prompt_sha1=same)])
        assert "different text-path prompt" not in caplog.text
        task.check_examples([replace(a, prompt_sha1=same), replace(b, prompt_sha1="0123456789abcdef")])
    assert "1 of 2 checked behavior lines" in caplog.text and b.id in caplog.text
