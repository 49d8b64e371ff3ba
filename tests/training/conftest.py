"""Fixtures of the training tests: tiny behavior manifests over synthetic audio and recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SR = 16000
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "a",
    "man",
    "in",
    "an",
    "orange",
    "hat",
    "is",
    "looking",
    "at",
    "something",
]


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f = 150 + 40 * (seed % 7)
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def write_behavior_manifest(folder: Path, n: int = 16, seed: int = 0, name: str = "train.jsonl") -> Path:
    """``n`` clips (0.3-1.5 s) with transcripts; half continuation, half repetition behavior lines."""
    import soundfile as sf

    from blsp.instructions import CONTINUATION, REPETITION

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wav").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        secs = float(np.round(0.3 + 1.2 * rng.random(), 2))
        wav = folder / "wav" / f"{name.split('.')[0]}-{i:03d}.wav"
        sf.write(wav, _clip(secs, seed * 1000 + i), SR)
        words = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + i % 4)]
        text = " ".join(words)
        rep = i % 2 == 1
        lines.append(
            {
                "id": f"{name.split('.')[0]}-{i:03d}",
                "audio": f"wav/{wav.name}",
                "text": text,
                "duration": secs,
                "behavior": "repetition" if rep else "continuation",
                "instruction": REPETITION if rep else CONTINUATION,
                "response": text if rep else " ".join(reversed(words)),
            }
        )
    path = folder / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="session")
def tiny_manifests(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("behaviors")
    return {
        "train": write_behavior_manifest(root, 16, seed=1, name="train.jsonl"),
        "eval": write_behavior_manifest(root, 4, seed=2, name="eval.jsonl"),
    }


@pytest.fixture
def tiny_recipe(tiny_dirs, tiny_manifests, tmp_path):
    """``tiny_recipe(**sections) -> dict``: a recipe on the tiny models (merge sections over it)."""

    def make(**over: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "name": "tiny",
            "model": {
                "encoder": str(tiny_dirs["whisper"]),
                "llm": str(tiny_dirs["llm"]),
                "blsp": {"adapter_bottleneck_dim": 16},
            },
            "data": {"train": [{"path": str(tiny_manifests["train"])}]},
            "train": {
                "lr": 3e-3,
                "warmup_steps": 0,
                "scheduler": "constant",
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "max_steps": 4,
                "seed": 0,
                "precision": "fp32",  # exact comparisons; bf16 is checked on its own
            },
            "run": {
                "output_dir": str(tmp_path / "run"),
                "save_every": 2,
                "progress": False,
                "tensorboard": False,
            },
        }
        for section, values in over.items():
            if isinstance(values, dict) and isinstance(cfg.get(section), dict):
                cfg[section] = {**cfg[section], **values}
            else:
                cfg[section] = values
        return cfg

    return make


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes
    each op up to ~40x slower; restore the setting afterwards. Real-model (slow) tests keep them."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
