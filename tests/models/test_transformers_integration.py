"""BLSP as a ``transformers`` model: AutoModel, hub ids (a local cache layout), the model card,
the ``pipeline`` task, and fine-tuned folders that every loader loads whole."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch


def _wave(seconds: float = 1.0, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_automodel_loads_a_saved_folder_with_its_card(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModel

    import blsp  # noqa: F401  (registers the auto classes)
    from blsp.models.modeling_blsp import BlspModel

    with torch.no_grad():
        tiny_model.adapter.fc2.weight.normal_()  # not the fresh init, so a round trip is checked
    tiny_model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md",
        "adapter.safetensors",
        "config.json",
    ]
    assert AutoConfig.from_pretrained(tmp_path / "a").model_type == "blsp"
    model = AutoModel.from_pretrained(tmp_path / "a", device="cpu")
    assert isinstance(model, BlspModel)
    for k, v in tiny_model.trainable_state_dict().items():
        assert torch.equal(model.trainable_state_dict()[k], v), k
    card = (tmp_path / "a" / "README.md").read_text()
    assert "library_name: blsp" in card and tiny_model.config.llm in card
    (tmp_path / "a" / "README.md").write_text(card + "\nA note of the author.\n")
    again = BlspModel.from_pretrained(tmp_path / "a", device="cpu")
    again.save_pretrained(tmp_path / "b")  # the card it was loaded with travels with it
    assert (tmp_path / "b" / "README.md").read_text().endswith("A note of the author.\n")


def test_hub_id_resolves_from_the_hugging_face_cache_layout(tiny_model, tmp_path, monkeypatch):
    """An ``org/name`` id goes through ``huggingface_hub``'s cache, as ``transformers`` models do."""
    from blsp.errors import ModelLoadError
    from blsp.models.modeling_blsp import BlspModel

    cache = tmp_path / "hub"
    snap = cache / "models--someone--blsp-tiny" / "snapshots" / ("0" * 40)
    tiny_model.save_pretrained(snap)
    (cache / "models--someone--blsp-tiny" / "refs").mkdir()
    (cache / "models--someone--blsp-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = BlspModel.from_pretrained("someone/blsp-tiny", cache_dir=str(cache), device="cpu")
    assert model.name_or_path == "someone/blsp-tiny"
    for k, v in tiny_model.trainable_state_dict().items():
        assert torch.equal(model.trainable_state_dict()[k], v), k
    with pytest.raises(ModelLoadError, match="someone/missing"):
        BlspModel.from_pretrained("someone/missing", cache_dir=str(cache))


def test_pipeline_task_answers_about_a_wav(tiny_model, tmp_path):
    import soundfile as sf
    from transformers import pipeline

    import blsp  # noqa: F401
    from blsp.inference.pipeline import SpeechPipeline

    tiny_model.save_pretrained(tmp_path / "a")
    wav = tmp_path / "clip.wav"
    sf.write(wav, _wave(), 16000)
    pipe = pipeline("blsp", model=str(tmp_path / "a"), model_kwargs={"device": "cpu"})
    out = pipe(str(wav), instruction="Please repeat the following words.", max_new_tokens=5)
    direct = SpeechPipeline(pipe.model)(str(wav), "Please repeat the following words.", max_new_tokens=5)
    assert out == {"generated_text": direct}
    asr = pipe({"audio": _wave(), "sampling_rate": 16000}, max_new_tokens=5)  # default: the ASR instruction
    assert asr["generated_text"] == SpeechPipeline(pipe.model)(
        _wave(), task="asr", sampling_rate=16000, max_new_tokens=5
    )


def test_finetuned_folder_loads_lora_and_encoder_everywhere(tiny_blsp_config, tmp_path):
    """A Table 4 folder (``lora/`` + ``encoder.safetensors``) gives the fine-tuned outputs through
    ``from_pretrained``, ``AutoModel`` and the pipeline; an adapter swap refuses it."""
    from transformers import AutoModel

    from blsp.errors import ModelLoadError
    from blsp.models.modeling_blsp import BlspModel
    from blsp.training.config import LoraConfig
    from blsp.training.finetune import apply_lora, save_finetuned

    torch.manual_seed(0)
    base = BlspModel.from_config(tiny_blsp_config, device="cpu")
    base.save_pretrained(tmp_path / "base")
    apply_lora(base, LoraConfig(train_encoder=True))
    with torch.no_grad():  # a fine-tune's effect: non-zero LoRA B and a changed encoder
        for name, p in base.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        base.encoder.whisper.layer_norm.weight.mul_(3.0)
    save_finetuned(base, tmp_path / "ft", train_encoder=True)
    assert not any(m.training for m in base.modules())  # apply_lora's new dropout follows the model
    assert not any(p.requires_grad for n, p in base.encoder.named_parameters() if "embed_positions" in n)
    batch = base.collate(
        [
            {
                "conversation": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "Repeat."}, {"type": "audio", "audio": _wave()}],
                    }
                ]
            }
        ]
    )
    with torch.no_grad():
        want = base(**batch).logits
    plain = BlspModel.from_pretrained(tmp_path / "base", device="cpu")
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, want, atol=1e-4)
    for loaded in (
        BlspModel.from_pretrained(tmp_path / "ft", device="cpu"),
        BlspModel.from_pretrained(tmp_path / "ft", device="cpu", merge_lora=False),
        AutoModel.from_pretrained(tmp_path / "ft", device="cpu"),
    ):
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, want, atol=1e-4, rtol=1e-4)
    from blsp.evaluation.system_specs import parse_system_specs
    from blsp.inference.pipeline import SpeechPipeline

    pipe = SpeechPipeline.from_pretrained(tmp_path / "ft", device="cpu")  # chat, serve, ui, generate
    systems = parse_system_specs(
        [f"base=blsp:{tmp_path / 'base'}", f"ft=blsp:{tmp_path / 'ft'}"], device="cpu"
    )
    evaluated = [s.model_handle.get() for s in systems]  # eval: the base first, then the fine-tune
    for loaded in (pipe.model, evaluated[1]):
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelLoadError, match="fine-tuned"):
        plain.load_adapter(tmp_path / "ft")
    shutil.rmtree(tmp_path / "ft" / "lora")
    (tmp_path / "ft" / "lora").mkdir()
    with pytest.raises(ModelLoadError, match="lora"):
        BlspModel.from_pretrained(tmp_path / "ft", device="cpu")


def test_int8_llm_stays_close_to_fp32(tiny_model, tmp_path):
    """``quantization="int8"``: the LLM's linear layers become dynamic int8 ones, the adapter and
    encoder stay fp32, and the logits stay close to the fp32 model's."""
    from blsp.errors import ModelLoadError
    from blsp.models.modeling_blsp import BlspModel

    tiny_model.save_pretrained(tmp_path / "a")
    q = BlspModel.from_pretrained(tmp_path / "a", device="cpu", quantization="int8")
    kinds = {type(m).__module__ for m in q.llm.modules() if "Linear" in type(m).__name__}
    assert any("quantized" in k for k in kinds), kinds
    assert q.adapter.fc1.weight.dtype == torch.float32
    batch = tiny_model.collate(
        [
            {
                "conversation": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "Repeat."}, {"type": "audio", "audio": _wave()}],
                    }
                ]
            }
        ]
    )
    with torch.no_grad():
        a, b = tiny_model(**batch).logits, q(**batch).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert 0.98 < cos < 1.0  # quantized: close, not the same
    conv = [{"conversation": batch and [{"role": "user", "content": [{"type": "audio", "audio": _wave()}]}]}]
    assert len(q.generate(conv, max_new_tokens=3, return_ids=True)[0]) <= 3
    with pytest.raises(ModelLoadError, match="int8"):
        BlspModel.from_pretrained(tmp_path / "a", device="cpu", quantization="int4")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA"):
            BlspModel.from_pretrained(tmp_path / "a", device="cpu", quantization="bnb-4bit")
