"""Task instructions (paper Table 11), specs of tasks and systems, the judge's verdicts."""

from __future__ import annotations

import pytest

from blsp.errors import BlspError
from blsp.evaluation.judge import JUDGE_PROMPT, judge_prompt, make_judge, parse_verdict
from blsp.evaluation.system_specs import parse_system_specs
from blsp.evaluation.systems import BlspSystem, CascadeSystem, TextSystem
from blsp.evaluation.tasks import make_task, parse_task_spec
from blsp.instructions import CONTINUATION, REPETITION, task_instruction


def test_task_instructions_are_the_papers():
    assert make_task("asr", []).instruction == "Please repeat the following words."
    assert (
        make_task("st:de", []).instruction == "Please translate the following English text into German text."
    )
    assert make_task("st:French", []).target_lang == "fr"
    assert (
        make_task("x2en:de", []).instruction
        == "Please translate the following German text into English text."
    )
    assert make_task("sentiment", []).instruction == task_instruction("sentiment")
    assert (
        make_task("fsc", []).instruction == task_instruction("fsc") and len(make_task("fsc", []).labels) == 18
    )
    items = [{"id": "1", "label": "SwitchLightOn"}, {"id": "2", "label": "SetLightColor"}]
    assert make_task("intent", items).instruction == task_instruction("snips")  # subset of SNIPS light
    other = make_task("intent", [{"id": "1", "intent": "PlayMusic"}, {"id": "2", "intent": "GetWeather"}])
    assert other.instruction == "Please classify the intent of the text, choose from [GetWeather, PlayMusic]."
    assert make_task("align", []).instruction == CONTINUATION
    assert make_task("align:repetition", []).instruction == REPETITION
    assert make_task("align:x2en:zh", []).instruction.startswith(
        "Please translate the following Chinese text"
    )
    assert parse_task_spec("st:de@tts-st-en") == ("st:de", "tts-st-en")
    assert parse_task_spec("asr") == ("asr", None)
    qa = make_task("qa", [{"id": "q", "question": "Who?", "answer": "Anna"}])
    assert qa.instruction_for(qa.items[0]) == "Who?" and qa.reference(qa.items[0]) == "Anna"
    with pytest.raises(BlspError, match="question"):
        qa.instruction_for({"id": "x"})
    with pytest.raises(BlspError):
        make_task("st", [])


def test_system_specs_share_the_text_path_model(tmp_path):
    a, b = tmp_path / "blsp", tmp_path / "rp"
    a.mkdir(), b.mkdir()
    systems = parse_system_specs(
        [f"blsp:{a}", f"BLSP+RP=blsp:{b}", "text", "whisper:whisper-tiny.en", f"asr-pretrain:{b}"]
    )
    names = [s.name for s in systems]
    assert names == ["blsp", "BLSP+RP", "Text+LLM", "Whisper+LLM", "ASR pretraining"]
    assert isinstance(systems[0], BlspSystem) and isinstance(systems[2], TextSystem)
    assert isinstance(systems[3], CascadeSystem)
    # Text+LLM and Whisper+LLM use the first adapter's model (loaded once); same folder -> same handle
    assert systems[2].model_handle is systems[0].model_handle is systems[3].model_handle
    assert systems[1].model_handle is systems[4].model_handle
    assert not systems[0].model_handle.loaded  # nothing loads until a system runs
    with pytest.raises(BlspError, match="two systems"):
        parse_system_specs(["text", "text"])
    with pytest.raises(BlspError, match="unknown kind"):
        parse_system_specs(["gpt4"])
    with pytest.raises(BlspError, match="needs a folder"):
        parse_system_specs(["ctc"])
    base = parse_system_specs(["text"], encoder="whisper-tiny.en", llm="smollm2-135m-instruct")[0]
    assert "whisper-tiny.en" in base.model_handle.label


def test_judge_prompt_and_verdicts():
    p = judge_prompt("What time?", "we meet at seven", "At seven.")
    assert p.startswith("Given a question, related input, and answer")
    assert "Question: What time?\nInput: we meet at seven\nAnswer: At seven.\nYour output:" in p
    assert "${" in JUDGE_PROMPT and "${" not in p
    assert parse_verdict("Acceptable") is True
    assert parse_verdict("unacceptable.") is False
    assert parse_verdict("The answer is not acceptable") is False
    assert parse_verdict("I am not sure") is None
    assert make_judge(None) is None
    assert make_judge("openai:gpt-4o-mini@http://127.0.0.1:9/v1").name.startswith("openai:gpt-4o-mini")
    with pytest.raises(BlspError):
        make_judge("openai:nomodel")


def test_adapters_of_one_config_share_one_loaded_model_and_swap_in_their_weights(tiny_model, tmp_path):
    import torch

    from blsp.models.modeling_blsp import BlspModel

    a, b = tmp_path / "a", tmp_path / "b"
    tiny_model.save_pretrained(a)
    with torch.no_grad():
        for p in tiny_model.adapter.parameters():
            p.add_(torch.randn_like(p))
    tiny_model.save_pretrained(b)
    sa, sb, text = parse_system_specs([f"A=blsp:{a}", f"B=blsp:{b}", "text"])
    assert sa.model_handle.shared is sb.model_handle.shared is not None
    assert text.model_handle is sa.model_handle

    def weights(m: BlspModel) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in m.trainable_state_dict().items()}

    wa = weights(sa.model)
    wb = weights(sb.model)
    assert sb.model is sa.model, "one encoder and one LLM for both adapters"
    alone = BlspModel.from_pretrained(b, device="cpu")
    assert all(torch.equal(wb[k], v) for k, v in alone.trainable_state_dict().items())
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(v, wa[k]) for k, v in weights(sa.model).items()), "swapped back to A's weights"
    # the model goes with the last handle that may use it
    sb.model_handle.release()
    assert sa.model_handle.shared.model is not None
    sa.model_handle.release()
    assert sa.model_handle.shared.model is None


def test_an_adapter_of_another_config_is_refused_by_load_adapter(tiny_model, tiny_blsp_config, tmp_path):
    from blsp.errors import ModelLoadError
    from blsp.models.modeling_blsp import BlspModel

    other = BlspModel.from_config(
        type(tiny_blsp_config)(**{**tiny_blsp_config.to_dict(), "adapter_bottleneck_dim": 8}), device="cpu"
    )
    other.save_pretrained(tmp_path / "o")
    with pytest.raises(ModelLoadError, match="another config"):
        tiny_model.load_adapter(tmp_path / "o")
