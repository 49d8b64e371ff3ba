"""Downstream LoRA fine-tuning (paper Table 4) and stage-1 instruction tuning, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blsp.instructions import task_instruction
from blsp.training.config import config_from_dict
from blsp.training.trainer import train


def test_lora_finetune_from_a_blsp_adapter(tiny_recipe, tiny_blsp_config, tiny_manifests, tmp_path):
    from blsp.models.modeling_blsp import BlspModel
    from blsp.models.prompt import make_conversation
    from blsp.training.finetune import load_finetuned

    torch.manual_seed(1)
    start = BlspModel.from_config(tiny_blsp_config, device="cpu")
    start.save_pretrained(tmp_path / "blsp")
    rec = tiny_recipe(
        model={"init_from": str(tmp_path / "blsp")},
        data={
            "train": [
                {
                    "path": str(tiny_manifests["train"]),
                    "task": "target",
                    "instruction": "st:German",
                    "target_field": "text",
                }
            ]
        },
        lora={"enabled": True, "dropout": 0.0},
        train={"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-2},
    )
    summary = train(config_from_dict(rec))
    final = tmp_path / "run" / "final"
    cfg = json.loads((final / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (16, 16)
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    lora = load_file(str(final / "lora" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at 0: trained
    enc = load_file(str(final / "encoder.safetensors"))
    before = start.encoder.whisper.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in enc.items())  # the encoder was trained
    adapter = load_file(str(final / "adapter.safetensors"))
    assert any(
        not torch.equal(v, start.adapter.state_dict()[k.removeprefix("adapter.")]) for k, v in adapter.items()
    )
    assert summary["steps"] == 3

    merged = load_finetuned(final, device="cpu")
    unmerged = load_finetuned(final, device="cpu", merge=False)
    loaded = BlspModel.from_pretrained(final, device="cpu")  # every loader loads the fine-tune whole
    adapter_only = tmp_path / "adapter_only"
    adapter_only.mkdir()
    for f in ("config.json", "adapter.safetensors"):
        (adapter_only / f).write_bytes((final / f).read_bytes())
    plain = BlspModel.from_pretrained(adapter_only, device="cpu")  # no LoRA, original encoder
    wav = str(tiny_manifests["eval"].parent / "wav" / "eval-000.wav")
    ex = [
        {"conversation": make_conversation(task_instruction("st:German"), audio=wav), "response": "the dog"}
    ]
    batch = merged.collate(ex)
    with torch.no_grad():
        a, b, c, d = (m(**batch).logits for m in (merged, unmerged, plain, loaded))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, d, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_stage1_sft_gives_an_llm_folder_that_blsp_uses(tiny_recipe, tiny_dirs, tmp_path, lora):
    from blsp.models.hub import load_llm
    from blsp.models.prompt import PromptBuilder

    rows = [
        {"id": str(i), "instruction": "please repeat the following words", "input": w, "output": w}
        for i, w in enumerate(
            [
                "the quick brown fox",
                "a man in an orange hat",
                "the lazy dog",
                "jumps over",
                "looking at something",
                "the brown dog",
                "an orange fox",
                "a quick man",
            ]
        )
    ]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = tiny_recipe(
        model={"llm": str(tiny_dirs["llm_paper"])},
        data={"train": [{"path": str(data), "task": "alpaca"}]},
        train={
            "objective": "sft",
            "max_steps": 6,
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "lr": 1e-2 if lora else 3e-3,
        },
        lora={"enabled": lora, "dropout": 0.0, "r": 8, "alpha": 16},
    )
    summary = train(config_from_dict(rec))
    # all weights fit the 8 lines fast; LoRA on attention moves a random tiny LLM less
    assert summary["final_loss"] < summary["first_loss"] - (0.1 if lora else 0.5)
    final = tmp_path / "run" / "final"
    llm, tok = load_llm(str(final))
    assert not any("lora" in n for n, _ in llm.named_parameters())  # merged into an ordinary model
    assert "###[Human]:" in tok.chat_template
    conv = [{"role": "user", "content": "please repeat the following words\nthe lazy dog"}]
    chat = PromptBuilder(tok, template="auto")
    paper = PromptBuilder(tok, template="paper")
    assert chat.use_chat and chat.text_prompt(conv) == paper.text_prompt(conv)
    assert chat.end_token_id == paper.end_token_id == tok.eos_token_id
