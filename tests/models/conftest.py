"""Fixtures for the model-loading tests: the blsp command, flite speech, converted real Whisper."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def blsp_cmd() -> list[str]:
    """The installed ``blsp`` console script (``python -m blsp.cli`` where it is not installed)."""
    exe = Path(sys.executable).with_name("blsp")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "blsp.cli"]


@pytest.fixture(scope="session")
def flite_wav(tmp_path_factory):
    """``flite_wav(text, voice="slt") -> Path``: speech synthesised by Debian's flite (cached per session)."""
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite)")
    root = tmp_path_factory.mktemp("flite")

    def make(text: str, voice: str = "slt") -> Path:
        out = root / f"{hashlib.sha1(f'{voice}|{text}'.encode()).hexdigest()[:12]}.wav"
        if not out.exists():
            subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(out)], check=True)
        return out

    return make


@pytest.fixture(scope="session")
def whisper_base_dir() -> Path:
    """whisper-base converted to a Hugging Face folder (in the shared blsp cache: converted once per machine)."""
    from blsp.models.hub import resolve

    return resolve("whisper-base", "whisper")
