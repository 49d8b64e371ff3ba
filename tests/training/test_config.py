"""Recipes are data: typed loading, overrides, unknown keys, the shipped configs."""

from __future__ import annotations

import pytest

from blsp.errors import BlspError, ConfigError
from blsp.recipes import RECIPES_DIR, list_recipes, recipe_path
from blsp.training.config import EXAMPLE_KINDS, OBJECTIVES, Config, config_from_dict, load_config


def test_shipped_recipes_load_and_mirror_the_paper():
    names = {r.name for r in list_recipes()}
    assert {"blsp", "blsp_rp", "asr_pretrain", "ctc", "finetune_st_lora", "blsp_7b_gpu"} <= names
    for r in list_recipes():
        assert isinstance(load_config(r.name), Config) and r.summary, r.name
    gpu = load_config("blsp_7b_gpu").train
    assert (gpu.lr, gpu.warmup_steps, gpu.weight_decay, gpu.max_grad_norm) == (5e-5, 1000, 0.05, 1.0)
    assert (gpu.global_batch_size, gpu.epochs, gpu.precision) == (768, 1.0, "bf16")
    rp = load_config("blsp_rp.yaml").data.train
    assert [s.weight for s in rp] == [9.0, 1.0] and rp[1].task == "repetition"
    ft = load_config(RECIPES_DIR / "finetune_st_lora.yaml").lora
    assert (
        ft.enabled
        and (ft.r, ft.alpha) == (16, 16)
        and ft.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


def test_a_recipe_is_a_shipped_name_or_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found in the package, not in a checkout's working directory
    assert recipe_path("blsp") == recipe_path("blsp.yaml") == RECIPES_DIR / "blsp.yaml"
    assert recipe_path("accelerate/ddp").is_file()
    own = tmp_path / "blsp.yaml"  # a file of that name wins over the shipped recipe
    own.write_text("name: mine\ndata:\n  train: [{path: a.jsonl}]\n")
    assert load_config("blsp.yaml").name == "mine" and load_config("blsp").name != "mine"
    with pytest.raises(ConfigError, match="shipped recipe: 'blsp_default'"):
        load_config("configs/blsp_default.yaml")  # the old repository path: named in the error
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope")
    assert {r.name for r in list_recipes(accelerate=True)} == {
        f"accelerate/{n}" for n in ("ddp", "fsdp", "zero2", "zero3")
    }


def test_allowed_values_come_from_the_literal_types():
    assert OBJECTIVES == ("ce", "kl", "ce+kl", "ctc", "sft")
    assert "alpaca" in EXAMPLE_KINDS and "repetition" in EXAMPLE_KINDS


@pytest.mark.parametrize(
    "data,key",
    [
        ({"train": {"lrr": 1}}, "train.lrr"),
        ({"modle": {}}, "modle"),
        ({"data": {"train": [{"path": "a.jsonl", "wieght": 2}]}}, "data.train[0].wieght"),
    ],
)
def test_unknown_key_is_named(data, key):
    base = {"data": {"train": [{"path": "x.jsonl"}]}}
    with pytest.raises(ConfigError) as e:
        config_from_dict({**base, **data})
    assert repr(key) in str(e.value) or key in str(e.value)


def test_did_you_mean_and_bad_values(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  train: [{path: x.jsonl}]\ntrain:\n  warmup_step: 3\n")
    with pytest.raises(
        ConfigError, match=r"r\.yaml.*'train\.warmup_step'.*did you mean 'train\.warmup_steps'"
    ):
        load_config(p)
    base = {"data": {"train": [{"path": "x.jsonl"}]}}
    with pytest.raises(ConfigError, match="train.objective"):
        config_from_dict({**base, "train": {"objective": "mse"}})
    with pytest.raises(ConfigError, match="train.micro_batch_size: expected an integer"):
        config_from_dict({**base, "train": {"micro_batch_size": "eight"}})
    with pytest.raises(ConfigError, match="at least one training manifest"):
        config_from_dict({})
    with pytest.raises(ConfigError, match="needs an 'instruction'"):
        config_from_dict({"data": {"train": [{"path": "x.jsonl", "task": "target"}]}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_typed_and_reach_lists():
    cfg = config_from_dict(
        {"data": {"train": [{"path": "a.jsonl"}]}},
        [
            "train.lr=1e-4",
            "train.max_steps=7",
            "data.train.0.weight=3",
            "data.train.1.path=b.jsonl",
            "model.blsp.adapter_bottleneck_dim=64",
            "run.tensorboard=false",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 7
    assert [s.path for s in cfg.data.train] == ["a.jsonl", "b.jsonl"] and cfg.data.train[0].weight == 3.0
    assert cfg.model.blsp == {"adapter_bottleneck_dim": 64} and cfg.run.tensorboard is False
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config_from_dict({"data": {"train": [{"path": "a"}]}}, ["train.lr"])
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        config_from_dict({"data": {"train": [{"path": "a"}]}}, ["train.nope=1"])


def test_round_trip_through_yaml():
    import yaml

    cfg = config_from_dict(
        {"name": "x", "data": {"train": [{"path": "a.jsonl", "weight": 1}]}}, ["train.lr=2e-5"]
    )
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_cli_print_config_and_error_exit(tmp_path, capsys):
    from blsp.cli import main

    p = tmp_path / "r.yaml"
    p.write_text("name: demo\ndata:\n  train: [{path: x.jsonl}]\n")
    assert main(["train", str(p), "--set", "train.lr=3e-4", "--print-config"]) == 0
    assert "lr: 0.0003" in capsys.readouterr().out
    assert main(["train", str(p), "--set", "train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err
    assert issubclass(ConfigError, BlspError)
