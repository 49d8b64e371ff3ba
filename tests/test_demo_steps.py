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


def test_every_paper_recipe_starts_from_the_demos_warm_start_and_one_from_scratch(tmp_path):
    steps = {s.name: s for s in demo.build_steps(tmp_path, demo.PRESETS["default"])}
    warm = "model.init_from=" + demo.display_path(tmp_path / "runs" / "align_ctc" / "final")
    assert steps["train_align_ctc"].argv[:3] == ["blsp", "train", "align_ctc"]  # a shipped recipe
    for name in demo.WARM:
        st = steps[f"train_{name}"]
        assert warm in st.argv and "train_align_ctc" in st.needs, name
    scratch = steps["train_blsp_scratch"]
    assert "model.init_from=null" in scratch.argv and "train_align_ctc" not in scratch.needs
    # BLSP and its from-scratch twin differ in the start only
    strip = {warm, "model.init_from=null"}
    blsp = [a for a in steps["train_blsp"].argv if a not in strip and "runs/blsp" not in a]
    assert blsp == [a for a in scratch.argv if a not in strip and "runs/blsp" not in a]


def test_an_evaluation_setting_changes_the_evaluation_command_only(tmp_path):
    p = dict(demo.PRESETS["default"])
    before = {s.name: s.argv for s in demo.build_steps(tmp_path, p)}
    after = {s.name: s.argv for s in demo.build_steps(tmp_path, {**p, "eval_items": p["eval_items"] * 2})}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"testsets", "eval"} and changed <= demo.EVAL_STEPS
    # ... and the settings the other steps' done-markers are keyed by leave it out: training is kept
    assert "eval_items" in demo.EVAL_PARAMS
