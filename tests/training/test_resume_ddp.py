"""Crash safety and distribution: SIGKILL + --resume, and 2-process DDP (gloo) vs 1 process."""

from __future__ import annotations

import contextlib
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

from blsp.recipes import recipe_path
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


# --------------------------------------------------------------------------- accelerate launch
ACCELERATE_DDP = recipe_path("accelerate/ddp")


def _accelerate_cmd(recipe: Path, nproc: int, *extra: str) -> list[str]:
    """``accelerate launch`` of ``blsp train`` on ``nproc`` CPU processes (gloo) with the DDP config."""
    import socket

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate not found next to the interpreter")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        str(accelerate),
        "launch",
        "--config_file",
        str(ACCELERATE_DDP),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(port),
        "-m",
        "blsp.cli",
        "train",
        str(recipe),
        *extra,
    ]


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every worker it started (torch elastic puts workers in their own sessions)."""
    import psutil

    root = psutil.Process(pid)
    procs = root.children(recursive=True) + [root]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["key"].startswith("train-")}


def _weight_diff(a: Path, b: Path) -> float:
    wa, wb = _adapter(a), _adapter(b)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


def _run_cfg(tiny_recipe, train: dict, out: Path, **run: object) -> dict:
    base = {"output_dir": str(out), "progress": False, "tensorboard": False, "log_every": 1}
    return tiny_recipe(train=train, run={**base, **run})


def test_accelerate_launch_two_processes_match_one_process(tiny_recipe, tmp_path):
    common = {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 1, "lr": 3e-3}
    rec = _run_cfg(tiny_recipe, common, tmp_path / "acc")
    recipe = tmp_path / "acc.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    res = subprocess.run(_accelerate_cmd(recipe, 2), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "acc" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == "ddp" and summary["samples"] == 12

    one = train(config_from_dict(_run_cfg(tiny_recipe, common, tmp_path / "one")))
    assert one["world_size"] == 1 and one["engine"] == "single"
    diff = _max_diff(_losses(tmp_path / "acc"), _losses(tmp_path / "one"))
    wdiff = _weight_diff(tmp_path / "acc" / "final", tmp_path / "one" / "final")
    print(
        f"accelerate 2 processes vs 1: max |loss difference| {diff:.3g}, max |adapter weight difference| {wdiff:.3g}"
    )
    assert diff < 1e-5
    _assert_close(_adapter(tmp_path / "acc" / "final"), _adapter(tmp_path / "one" / "final"), atol=1e-5)


def test_accelerate_sigkill_then_resume_on_two_and_on_one_process(tiny_recipe, tmp_path):
    """SIGKILL an ``accelerate launch`` run of 2 processes; ``--resume`` it with 2 processes, and a
    copy of it with 1 process: both end where an uninterrupted run ends."""
    import shutil

    steps = 12
    common = {
        "max_steps": steps,
        "global_batch_size": 4,
        "micro_batch_size": 1,
        "lr": 3e-3,
        "scheduler": "cosine",
        "warmup_steps": 2,
    }
    rec = _run_cfg(tiny_recipe, common, tmp_path / "killed", save_every=3, keep_last=2)
    recipe = tmp_path / "killed.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    ckpts = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen(
        _accelerate_cmd(recipe, 2),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not (ckpts / ck.checkpoint_name(6)).is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        _kill_tree(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it was killed"
    _assert_complete(ckpts)
    killed_at = ck.list_checkpoints(ckpts)[-1][0]
    assert 6 <= killed_at < steps
    shutil.copytree(tmp_path / "killed", tmp_path / "one_proc")

    res = subprocess.run(
        _accelerate_cmd(recipe, 2, "--resume"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == steps and summary["samples"] == steps * 4 and summary["world_size"] == 2
    logged = [json.loads(x)["step"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert sorted(logged) == list(range(1, steps + 1))  # no step logged twice or lost

    # the world size changes on resume: 2 processes -> 1
    on_one = train(
        config_from_dict({**rec, "run": {**rec["run"], "output_dir": str(tmp_path / "one_proc")}}),
        resume=True,
    )
    assert on_one["world_size"] == 1 and on_one["samples"] == steps * 4

    straight = train(config_from_dict(_run_cfg(tiny_recipe, common, tmp_path / "straight")))
    ref = _losses(tmp_path / "straight")
    d2 = _max_diff(_losses(tmp_path / "killed"), ref)
    d1 = _max_diff(_losses(tmp_path / "one_proc"), ref)
    w2 = _weight_diff(tmp_path / "killed" / "final", tmp_path / "straight" / "final")
    w1 = _weight_diff(tmp_path / "one_proc" / "final", tmp_path / "straight" / "final")
    print(
        f"SIGKILL after checkpoint {killed_at}; vs uninterrupted: resumed on 2 processes max |loss difference| "
        f"{d2:.3g}, |weight difference| {w2:.3g}; resumed on 1 process {d1:.3g}, {w1:.3g}"
    )
    assert d2 < 1e-5 and d1 < 1e-5
    assert straight["final_loss"] == pytest.approx(summary["final_loss"], abs=1e-5)
    want = _adapter(tmp_path / "straight" / "final")
    _assert_close(_adapter(tmp_path / "killed" / "final"), want, atol=1e-5)
    _assert_close(_adapter(tmp_path / "one_proc" / "final"), want, atol=1e-5)


def test_engines_that_cannot_run_here_fail_clearly(tiny_recipe, tmp_path, monkeypatch):
    import importlib.util

    from blsp.errors import BlspError

    cfg = config_from_dict(_run_cfg(tiny_recipe, {"max_steps": 1}, tmp_path / "run"))
    if importlib.util.find_spec("deepspeed") is None:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        with pytest.raises(BlspError, match="pip install deepspeed"):
            train(cfg)
        monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    if not torch.cuda.is_available():
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(BlspError, match="FSDP .* GPUs only"):
            train(cfg)
        monkeypatch.delenv("ACCELERATE_USE_FSDP")
    # a recipe that names its engine refuses a launch with another one (here: one plain process)
    for strategy in ("fsdp", "deepspeed"):
        named = config_from_dict({**cfg.to_dict(), "distributed": {"strategy": strategy}})
        with pytest.raises(BlspError, match=f"distributed.strategy is {strategy}"):
            train(named)
    assert not (tmp_path / "run").exists()  # refused before anything was written
