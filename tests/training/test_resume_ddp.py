"""Crash safety and distribution: SIGKILL + --resume, and 2-process DDP (gloo) vs 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from blsp.training import checkpoint as ck
from blsp.training.config import config_from_dict
from blsp.training.trainer import train

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _assert_complete(ckpt_dir: Path) -> None:
    for p in ckpt_dir.iterdir():
        if p.name.startswith(ck.PREFIX):  # anything that looks like a checkpoint is a whole one
            assert (p / ck.META).is_file()
            load_file(str(p / ck.WEIGHTS / "adapter.safetensors"))
            assert ck.load_trainer_state(p)["step"] == int(p.name[len(ck.PREFIX) :])


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_recipe, tmp_path):
    steps = 30
    rec = tiny_recipe(
        train={
            "max_steps": steps,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "scheduler": "cosine",
            "warmup_steps": 3,
        },
        run={
            "output_dir": str(tmp_path / "killed"),
            "save_every": 3,
            "keep_last": 2,
            "progress": False,
            "tensorboard": False,
            "log_every": 1,
        },
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    ckpts = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blsp.cli", "train", str(recipe)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not (ckpts / ck.checkpoint_name(6)).is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it was killed"
    _assert_complete(ckpts)
    killed_at = ck.list_checkpoints(ckpts)[-1][0]
    assert 6 <= killed_at < steps

    summary = train(config_from_dict(rec), resume=True)
    assert summary["steps"] == steps and summary["samples"] == steps * 4
    _assert_complete(ckpts)
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    logged = [json.loads(x)["step"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert sorted(logged) == list(range(1, steps + 1))  # no step logged twice or lost

    straight = tiny_recipe(train=rec["train"], run={**rec["run"], "output_dir": str(tmp_path / "straight")})
    train(config_from_dict(straight))
    _assert_close(
        _adapter(tmp_path / "killed" / "final"), _adapter(tmp_path / "straight" / "final"), atol=1e-5
    )


def test_ddp_two_processes_match_one_process(tiny_recipe, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not found next to the interpreter")
    common = {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 1, "lr": 3e-3}
    rec = tiny_recipe(
        train=common,
        run={"output_dir": str(tmp_path / "ddp"), "progress": False, "tensorboard": False, "log_every": 1},
    )
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    res = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "blsp.cli", "train", str(recipe)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples"] == 12
    rows = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 3  # written once, by rank 0

    single = tiny_recipe(
        train=common, run={"output_dir": str(tmp_path / "one"), "progress": False, "tensorboard": False}
    )
    one = train(config_from_dict(single))
    assert one["world_size"] == 1
    _assert_close(_adapter(tmp_path / "ddp" / "final"), _adapter(tmp_path / "one" / "final"), atol=1e-5)
    losses_ddp = [json.loads(r)["loss"] for r in rows]
    assert losses_ddp[0] == pytest.approx(one["first_loss"], rel=1e-5)
