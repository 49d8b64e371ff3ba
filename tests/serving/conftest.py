"""Fixtures for the serving tests: an untrained real adapter saved once, and `blsp` server processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 300  # model load on a busy 2-core machine


def blsp_command() -> list[str]:
    exe = Path(sys.executable).with_name("blsp")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "blsp.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    proc: subprocess.Popen
    url: str
    log: Path
    model: str

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start(args: list[str], ready_path: str, log: Path, model: str = "") -> Running:
    """Start ``blsp ARGS --port P`` and wait until ``GET ready_path`` answers 200."""
    import httpx

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [*blsp_command(), *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    run = Running(proc, f"http://127.0.0.1:{port}", log, model)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`blsp {args[0]}` exited with {proc.returncode}:\n{run.log_tail()}")
        try:
            if httpx.get(run.url + ready_path, timeout=5).status_code == 200:
                return run
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(run)
    raise RuntimeError(f"`blsp {args[0]}` not ready after {START_TIMEOUT_S} s:\n{run.log_tail()}")


def stop(run: Running) -> None:
    if run.proc.poll() is None:
        run.proc.terminate()
        try:
            run.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait(timeout=10)


@pytest.fixture
def launch():
    """``launch(args, ready_path, log) -> Running``: a `blsp` process, stopped after the test."""
    runs: list[Running] = []

    def _launch(args: list[str], ready_path: str, log: Path) -> Running:
        run = start(args, ready_path, log)
        runs.append(run)
        return run

    yield _launch
    for run in runs:
        stop(run)


@pytest.fixture(scope="session")
def real_adapter_dir(real_model, tmp_path_factory) -> Path:
    """whisper-base + smollm2-135m-instruct with an untrained adapter, saved once per session."""
    path = tmp_path_factory.mktemp("real_adapter") / "blsp-untrained"
    real_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def server(real_adapter_dir, tmp_path_factory):
    """`blsp serve` on loopback with small limits: 1 MB bodies, 10 s clips, 24 tokens."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    run = start(
        [
            "serve",
            str(real_adapter_dir),
            "--device",
            "cpu",
            "--max-body-mb",
            "1",
            "--max-audio-seconds",
            "10",
            "--max-tokens-limit",
            "24",
            "--default-max-tokens",
            "16",
            "--batch-wait-ms",
            "300",
        ],
        "/health",
        log,
        model=real_adapter_dir.name,
    )
    yield run
    stop(run)
