"""The demo's step graph: what it evaluates (no step runs here)."""

from __future__ import annotations

from blsp import demo


def _eval_argv(tmp_path, **models) -> list[str]:
    steps = {s.name: s for s in demo.build_steps(tmp_path, demo.PRESETS["quick"], **models)}
    return steps["eval"].argv


def test_the_shipped_adapter_is_evaluated_beside_the_demo_systems_on_its_own_models(tmp_path):
    argv = _eval_argv(tmp_path)
    assert "shipped=blsp:blsp-base" in argv
    assert "content@tts-asr-en" in argv  # every system's matched/shuffled gap is in the report
    other = _eval_argv(tmp_path, encoder="some/whisper", llm="some/llm")
    assert not any(a.startswith("shipped=") for a in other)  # trained for other models: left out
