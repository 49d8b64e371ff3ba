"""The training loop end to end on the tiny model: outputs, retention, resume checks, NaN, cache,
over-long lines."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from blsp.errors import BlspError
from blsp.training import checkpoint as ck
from blsp.training.config import config_from_dict, load_config
from blsp.training.trainer import train


def _adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


def test_run_writes_everything_and_reloads(tiny_recipe, tiny_manifests, tmp_path):
    from blsp.models.modeling_blsp import BlspModel

    rec = tiny_recipe(
        data={
            "train": [{"path": str(tiny_manifests["train"])}],
            "eval": [{"path": str(tiny_manifests["eval"])}],
        },
        run={
            "output_dir": str(tmp_path / "run"),
            "save_every": 1,
            "keep_last": 2,
            "eval_every": 2,
            "eval_at_start": True,
            "log_every": 1,
            "tensorboard": True,
            "progress": True,
        },
        train={
            "max_steps": 4,
            "scheduler": "linear",
            "warmup_steps": 2,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "seed": 0,
        },
    )
    summary = train(config_from_dict(rec))
    run = tmp_path / "run"
    # resolved config kept, and loadable as a recipe
    assert load_config(run / "config.yaml").train.max_steps == 4
    # keep-last-2 retention, complete checkpoints only
    assert [s for s, _ in ck.list_checkpoints(run / "checkpoints")] == [3, 4]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    state = ck.load_trainer_state(run / "checkpoints" / "step-00000004")
    assert state["step"] == 4 and state["position"] == (1, 0) and len(state["rng"]) == 1
    # logs, events, summary
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["key"].startswith("train")] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["key"].startswith("eval")] == [0, 2, 4]
    train_rows = [r for r in rows if r["key"].startswith("train")]
    assert train_rows[0]["lr"] == pytest.approx(5e-4) and train_rows[1]["lr"] == pytest.approx(1e-3)  # warmup
    assert [r["samples_seen"] for r in train_rows] == [4, 8, 12, 16]
    assert all(r["samples_per_s"] > 0 for r in rows if "samples_per_s" in r)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((run / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (
        saved["steps"] == 4 and saved["samples"] == 16 and saved["eval_loss"] > 0 and saved["peak_rss_mb"] > 0
    )
    # the content check rides along every held-out evaluation
    assert saved["eval_gap"] == pytest.approx(saved["eval_shuffled_loss"] - saved["eval_loss"])
    assert all(set(e) >= {"loss", "shuffled", "gap"} for _step, e in saved["eval_history"])
    assert all("eval_gap" in r for r in rows if r["key"].startswith("eval"))
    # the final adapter equals the last checkpoint's and loads as a BLSP model
    final = run / "final"
    for k, v in _adapter(final).items():
        assert torch.equal(v, _adapter(run / "checkpoints" / "step-00000004" / "weights")[k])
    model = BlspModel.from_pretrained(final, device="cpu")
    from blsp.instructions import CONTINUATION
    from blsp.models.prompt import make_conversation

    out = model.generate(
        [
            {
                "conversation": make_conversation(
                    CONTINUATION, audio=str(tiny_manifests["eval"].parent / "wav" / "eval-000.wav")
                )
            }
        ],
        max_new_tokens=4,
    )
    assert isinstance(out[0], str)


def test_existing_run_and_foreign_resume_are_errors(tiny_recipe, tmp_path):
    rec = tiny_recipe(train={"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 4})
    train(config_from_dict(rec))
    with pytest.raises(BlspError, match="already holds a run.*--resume"):
        train(config_from_dict(rec))
    other = tiny_recipe(train={"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 4, "lr": 0.5})
    with pytest.raises(BlspError, match=r"another config.*train\.lr"):
        train(config_from_dict(other), resume=True)
    with pytest.raises(BlspError, match="no such run folder"):
        train(config_from_dict(rec), resume=str(tmp_path / "elsewhere"))
    # resuming a finished run is a no-op that keeps its result
    again = train(config_from_dict(rec), resume=True)
    assert again["steps"] == 2


def test_nan_loss_stops_with_step_and_ids_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path):
    rec = tiny_recipe(
        train={"max_steps": 6, "lr": 1e30, "global_batch_size": 4, "micro_batch_size": 2},
        run={"output_dir": str(tmp_path / "run"), "save_every": 1, "progress": False, "tensorboard": False},
    )
    with pytest.raises(BlspError) as e:
        train(config_from_dict(rec))
    msg = str(e.value)
    assert "non-finite" in msg and "at step 2" in msg and "batch ids: train-0" in msg
    assert "last good checkpoint" in msg and "step-00000001" in msg
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]
    assert not (tmp_path / "run" / "final").exists()


def test_encoder_cache_and_loader_workers_change_nothing(tiny_recipe, tmp_path):
    common = {"max_steps": 8, "global_batch_size": 4, "micro_batch_size": 2}  # 2 epochs of 16
    plain = train(
        config_from_dict(
            tiny_recipe(
                train=common, run={"output_dir": str(tmp_path / "a"), "progress": False, "tensorboard": False}
            )
        )
    )
    cached = train(
        config_from_dict(
            tiny_recipe(
                train=common,
                data={
                    "train": tiny_recipe()["data"]["train"],
                    "encoder_cache": str(tmp_path / "cache"),
                    "num_workers": 2,
                },
                run={"output_dir": str(tmp_path / "b"), "progress": False, "tensorboard": False},
            )
        )
    )
    assert plain["encoder_cache"] is None
    assert cached["encoder_cache"] == {"encoded": 16, "served": 16, "writable": True}
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 16
    a, b = _adapter(tmp_path / "a" / "final"), _adapter(tmp_path / "b" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _quiet(tmp_path, name: str) -> dict:
    return {"output_dir": str(tmp_path / name), "progress": False, "tensorboard": False, "log_every": 1}


def _losses(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["key"].startswith("train")]


def test_resume_refuses_changed_training_data_unless_accepted(
    tiny_recipe, tiny_manifests, tmp_path, monkeypatch, caplog
):
    from blsp.cli import main

    monkeypatch.setenv("BLSP_CACHE", str(tmp_path / "cache"))  # file_sha256's memo
    shutil.copytree(tiny_manifests["train"].parent, tmp_path / "data")
    manifest = tmp_path / "data" / "train.jsonl"
    rec = tiny_recipe(
        data={"train": [{"path": str(manifest)}]},
        train={"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 4},
    )
    train(config_from_dict(rec))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert json.loads((ckpt / ck.META).read_text())["data"]["sources"][0]["path"] == str(manifest.resolve())
    train(config_from_dict(rec), resume=True)  # the same data: resumes

    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    rows[0]["response"] += " and more"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BlspError) as e:
        train(config_from_dict(rec), resume=True)
    msg = str(e.value)
    assert f"training data changed since {ckpt}" in msg
    assert (
        f"data.train[0] {manifest.resolve()}: content changed" in msg and "--resume-accept-data-change" in msg
    )

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    assert main(["train", str(recipe), "--resume-accept-data-change"]) == 2  # only with --resume
    assert main(["train", str(recipe), "--resume"]) == 2
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["train", str(recipe), "--resume", "--resume-accept-data-change"]) == 0
    assert "training data changed since" in caplog.text and "(accepted)" in caplog.text


def test_an_overlong_response_is_skipped_at_load(tiny_recipe, tiny_manifests, tmp_path, caplog):
    shutil.copytree(tiny_manifests["train"].parent, tmp_path / "data")
    manifest = tmp_path / "data" / "train.jsonl"
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    rows[3]["response"] = "the quick brown fox jumps over the lazy dog " * 400  # thousands of tokens
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = tiny_recipe(
        data={"train": [{"path": str(manifest)}]}, train={"max_steps": 1}, run=_quiet(tmp_path, "r")
    )
    with caplog.at_level("WARNING"):
        train(config_from_dict(rec))  # the default data.max_text_tokens=1024
    assert "skipped 1 lines: 1 x response longer than data.max_text_tokens=1024 tokens (first on line 4)" in (
        caplog.text
    )


def test_a_cold_and_a_warm_encoder_cache_train_bit_identically(tiny_recipe, tmp_path):
    """A miss is rounded to the cache dtype as a hit comes back: the same batches either way."""

    def run(name: str) -> dict:
        data = {
            "train": tiny_recipe()["data"]["train"],
            "encoder_cache": str(tmp_path / "cache"),
            "cache_dtype": "float16",
        }
        return train(config_from_dict(tiny_recipe(data=data, run=_quiet(tmp_path, name))))

    cold, warm = run("cold"), run("warm")  # 4 steps of 4: one epoch of the 16 clips
    assert cold["encoder_cache"] == {"encoded": 16, "served": 0, "writable": True}
    assert warm["encoder_cache"] == {"encoded": 0, "served": 16, "writable": True}
    assert _losses(tmp_path / "cold") == _losses(tmp_path / "warm")
    a, b = _adapter(tmp_path / "cold" / "final"), _adapter(tmp_path / "warm" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unwritable_encoder_cache_is_one_warning(tiny_recipe, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should go")
    data = {"train": tiny_recipe()["data"]["train"], "encoder_cache": str(blocker / "cache")}
    with caplog.at_level("WARNING"):
        summary = train(config_from_dict(tiny_recipe(data=data, run=_quiet(tmp_path, "r"))))
    assert summary["encoder_cache"] == {"encoded": 16, "served": 0, "writable": False}
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and "without caching" in warnings[0].getMessage()
    assert (tmp_path / "r" / "final").is_dir()
