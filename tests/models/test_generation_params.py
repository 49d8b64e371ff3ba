"""The one generation settings type: one greedy/sampling convention, the flags that map onto it."""

from __future__ import annotations

import pytest

from blsp.errors import BlspError, ConfigError
from blsp.models.generation_blsp import SAMPLING_TOP_K, GenerationParams


def test_temperature_zero_is_greedy_and_sampling_rows_share_a_key():
    greedy = GenerationParams(max_new_tokens=5, top_p=0.5)
    assert not greedy.do_sample
    assert greedy.batch_key == GenerationParams().batch_key  # top_p does not matter when greedy
    hot = GenerationParams(temperature=0.7, top_p=0.9)
    assert hot.do_sample and hot.top_k == SAMPLING_TOP_K
    assert hot.batch_key != GenerationParams(temperature=0.7, top_p=0.9, top_k=0).batch_key
    assert GenerationParams(stop=("", "x", "")).stop == ("x",)
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -1}):
        with pytest.raises(ConfigError):
            GenerationParams(**bad)
    assert issubclass(ConfigError, BlspError)


def test_do_sample_flags_map_onto_temperature():
    f = GenerationParams.from_flags
    assert f().temperature == 0.0  # nothing said: greedy
    assert f(temperature=0.8).temperature == 0.8  # a temperature alone samples
    assert f(do_sample=False, temperature=0.8).temperature == 0.0  # generate()'s convention
    assert f(do_sample=True).temperature == 1.0
    assert f(do_sample=True, temperature=0.5, top_p=0.9).batch_key == (True, 0.5, 0.9, SAMPLING_TOP_K)
    with pytest.raises(ConfigError, match="when sampling"):
        f(do_sample=True, temperature=0)


def test_updated_replaces_only_what_is_given():
    d = GenerationParams(max_new_tokens=128, temperature=0.3, top_p=0.8, top_k=0, seed=4)
    u = d.updated(max_new_tokens=9, stop="END")
    assert (u.max_new_tokens, u.temperature, u.top_p, u.top_k, u.seed, u.stop) == (
        9,
        0.3,
        0.8,
        0,
        4,
        ("END",),
    )
    assert d.updated(temperature=0).do_sample is False


def test_behavior_settings_keep_their_line_format():
    from blsp.behaviors.backends import behavior_params

    assert behavior_params(max_new_tokens=6).record() == {"max_new_tokens": 6, "do_sample": False}
    s = behavior_params(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    assert isinstance(s, GenerationParams) and s.top_k == 0
    assert s.record() == {
        "max_new_tokens": 8,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.9,
        "seed": 3,
    }
    assert behavior_params(do_sample=False, temperature=0.8).do_sample is False


@pytest.mark.parametrize(
    "flags, temperature",
    [
        ([], 0.0),
        (["--do-sample"], 1.0),
        (["--do-sample", "--temperature", "0.7"], 0.7),
        (["--temperature", "0.7"], 0.7),
        (["--temperature", "0"], 0.0),
    ],
)
def test_behave_decoding_flags(flags, temperature):
    from blsp.behaviors.cli import settings_from_args
    from blsp.cli import build_parser

    args = build_parser().parse_args(["behave", "m.jsonl", "o.jsonl", "--max-new-tokens", "7", *flags])
    s = settings_from_args(args)
    assert (s.temperature, s.max_new_tokens, s.top_k) == (temperature, 7, 0)


def test_behave_do_sample_at_temperature_zero_is_refused():
    from blsp.behaviors.cli import settings_from_args
    from blsp.cli import build_parser

    args = build_parser().parse_args(["behave", "m.jsonl", "o.jsonl", "--do-sample", "--temperature", "0"])
    with pytest.raises(ConfigError, match="when sampling"):
        settings_from_args(args)
