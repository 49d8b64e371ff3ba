"""What blsp hands vLLM (prompt embeddings and sampling fields), built without vLLM (tiny model)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from blsp.errors import BlspError
from blsp.inference.generate import GenerationParams, prepare_conversation
from blsp.inference.vllm_engine import (
    build_requests,
    engine_kwargs,
    import_vllm,
    result_from_completion,
    sampling_fields,
)


def _clip(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def _conversations() -> list[list[dict]]:
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "please repeat the following words"},
                    {"type": "audio", "audio": _clip(1.0, 1)},
                ],
            }
        ],
        [{"role": "user", "content": "the quick brown fox"}],
        [
            {"role": "system", "content": "a man in an orange hat"},
            {"role": "user", "content": [{"type": "audio", "audio": _clip(0.4, 2)}]},
            {"role": "assistant", "content": "the lazy dog"},
            {"role": "user", "content": [{"type": "audio", "audio": _clip(1.7, 3)}]},
        ],
    ]


def _solo_embeds(model, example) -> torch.Tensor:
    """``BlspModel.embed`` of one prepared example alone: no padding anywhere."""
    batch = model.collate([{"conversation": example.conversation}])
    with torch.inference_mode():
        e = model.embed(
            batch["input_ids"],
            batch["speech_mask"],
            batch.get("input_features"),
            batch.get("feature_lengths"),
        )
    return e[0]


def test_prompt_embeds_are_the_unpadded_embeddings_of_each_example(tiny_model):
    prepared = [prepare_conversation(tiny_model, c) for c in _conversations()]
    reqs = build_requests(tiny_model, prepared, GenerationParams(max_new_tokens=5))
    assert len(reqs) == 3
    hidden = tiny_model.llm.get_input_embeddings().weight.shape[1]
    for ex, req in zip(prepared, reqs, strict=True):
        solo = _solo_embeds(tiny_model, ex)
        assert req.prompt_embeds.shape == (ex.prompt_tokens, hidden) == solo.shape
        assert req.prompt_tokens == ex.prompt_tokens
        assert req.prompt_embeds.dtype == tiny_model.llm.dtype and req.prompt_embeds.device.type == "cpu"
        assert req.prompt_embeds.is_contiguous()
        torch.testing.assert_close(req.prompt_embeds, solo.cpu(), rtol=0, atol=1e-5)
        assert set(req.prompt) == {"prompt_embeds"} and req.prompt["prompt_embeds"] is req.prompt_embeds
    # the speech rows differ from their text-only layout: the adapter output is spliced in
    text_only = tiny_model.llm.get_input_embeddings()(
        tiny_model.collate([{"conversation": prepared[0].conversation}])["input_ids"]
    )[0]
    assert not torch.allclose(reqs[0].prompt_embeds, text_only.detach())


def test_prompt_embeds_in_the_dtype_vllm_runs(tiny_model):
    ex = prepare_conversation(tiny_model, _conversations()[0])
    (req,) = build_requests(tiny_model, [ex], GenerationParams(), dtype=torch.bfloat16)
    assert req.prompt_embeds.dtype == torch.bfloat16
    torch.testing.assert_close(req.prompt_embeds.float(), _solo_embeds(tiny_model, ex), rtol=1e-2, atol=1e-2)


def test_sampling_fields_map_generation_params(tiny_model):
    stops = tiny_model.prompt.stop_token_ids
    greedy = sampling_fields(GenerationParams(max_new_tokens=7, temperature=0.0, top_p=0.5), stops, seed=3)
    assert greedy["temperature"] == 0.0  # vLLM's greedy
    assert greedy["top_p"] == 1.0 and greedy["seed"] is None  # neutral when greedy
    assert greedy["max_tokens"] == 7 and greedy["n"] == 1
    assert greedy["stop_token_ids"] == sorted(stops) and greedy["stop"] == []
    assert greedy["include_stop_str_in_output"] is False and greedy["skip_special_tokens"] is True

    sampled = sampling_fields(
        GenerationParams(max_new_tokens=9, temperature=0.7, top_p=0.9, stop=("END", "", "\n\n")),
        stops,
        seed=11,
    )
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["seed"] == 11
    assert sampled["stop"] == ["END", "\n\n"]  # empty stop strings dropped, as blsp does

    prepared = [prepare_conversation(tiny_model, c) for c in _conversations()[:2]]
    params = [GenerationParams(max_new_tokens=4), GenerationParams(max_new_tokens=6, temperature=1.2)]
    reqs = build_requests(tiny_model, prepared, params, seed=5)
    assert [r.sampling["max_tokens"] for r in reqs] == [4, 6]
    assert [r.sampling["temperature"] for r in reqs] == [0.0, 1.2]
    assert [r.sampling["seed"] for r in reqs] == [None, 5]
    with pytest.raises(BlspError, match="generation settings"):
        build_requests(tiny_model, prepared, params[:1])
    assert build_requests(tiny_model, [], []) == []


def test_sampling_fields_are_valid_vllm_sampling_params():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (GPU machines only)")
    from vllm import SamplingParams

    SamplingParams(**sampling_fields(GenerationParams(temperature=0.5, stop=("x",)), [1, 2], seed=1))


def test_completion_maps_to_blsp_result(tiny_model):
    stops = tiny_model.prompt.stop_token_ids
    end = stops[0]
    done = SimpleNamespace(text="  the lazy dog ", token_ids=[5, 6, 7, end], finish_reason="stop")
    r = result_from_completion(done, GenerationParams(), stops, prompt_tokens=12)
    assert (r.text, r.token_ids, r.finish_reason, r.prompt_tokens) == ("the lazy dog", [5, 6, 7], "stop", 12)
    cut = SimpleNamespace(text="a b", token_ids=[5, 6], finish_reason="length")
    assert result_from_completion(cut, GenerationParams(), stops, 3).finish_reason == "length"
    held = SimpleNamespace(text="one END two", token_ids=[5, 6, 7], finish_reason="length")
    r = result_from_completion(held, GenerationParams(stop=("END",)), stops, 3)
    assert (r.text, r.finish_reason) == ("one", "stop")


def test_engine_arguments_and_missing_vllm(tiny_model, tmp_path):
    kw = engine_kwargs(tiny_model, max_model_len=512)
    assert kw["enable_prompt_embeds"] is True and kw["max_model_len"] == 512
    assert kw["dtype"] == str(tiny_model.llm.dtype).removeprefix("torch.")
    assert kw["model"] == kw["tokenizer"] and (tmp_path / "x").parent.exists()
    (tmp_path / "ft" / "lora").mkdir(parents=True)
    with pytest.raises(BlspError, match="LoRA"):
        engine_kwargs(tiny_model, adapter_dir=tmp_path / "ft")
    assert engine_kwargs(tiny_model, adapter_dir=tmp_path / "ft", llm="merged")["model"] == "merged"
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(BlspError, match="pip install vllm"):
            import_vllm()


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_backend_vllm_without_vllm_is_a_clear_error(command, tmp_path, capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    from blsp.cli import main

    args = (
        [str(tmp_path / "m.jsonl"), str(tmp_path / "o.jsonl"), "--task", "asr"]
        if command == "generate"
        else []
    )
    if command == "serve":
        pytest.importorskip("fastapi")
        import blsp.inference.pipeline as pl

        def no_model(*a, **k):  # the check comes first; no model is needed to see it
            raise AssertionError("the model was loaded before vllm was checked")

        mp = pytest.MonkeyPatch()
        mp.setattr(pl.SpeechPipeline, "from_pretrained", classmethod(no_model))
    try:
        assert main([command, "blsp-base", *args, "--backend", "vllm"]) == 2
    finally:
        if command == "serve":
            mp.undo()
    assert "pip install vllm" in capsys.readouterr().err
