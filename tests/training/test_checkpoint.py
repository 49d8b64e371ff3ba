"""Checkpoint folders: atomic publication, retention, leftovers of a killed writer, pickle-free state."""

from __future__ import annotations

import re

import pytest

from blsp.errors import BlspError
from blsp.training import checkpoint as ck


def _weights(path):
    path.mkdir(parents=True)
    (path / "adapter.safetensors").write_bytes(b"x" * 10)


def test_save_list_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, _weights, {"step": step}, {"name": "t"}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    assert ck.latest_checkpoint(tmp_path).name == "step-00000004"
    assert ck.load_trainer_state(tmp_path / "step-00000004")["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def test_a_failed_write_leaves_no_checkpoint(tmp_path):
    def broken(path):
        _weights(path)
        raise OSError("disk full")

    ck.save_checkpoint(tmp_path, 1, _weights, {"step": 1}, {}, keep_last=3)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, broken, {"step": 2}, {}, keep_last=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_leftovers_of_a_killed_writer_are_ignored_then_cleaned(tmp_path):
    ck.save_checkpoint(tmp_path, 5, _weights, {"step": 5}, {}, keep_last=3)
    _weights(tmp_path / ".tmp-step-00000006-123" / "weights")  # killed mid-write
    _weights(tmp_path / ".trash-step-00000002-123" / "weights")  # killed mid-delete
    (tmp_path / "step-00000007").mkdir()  # no meta.json: not a checkpoint
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5]
    assert ck.clean_partial(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005", "step-00000007"]


def test_publish_dir_replaces_atomically(tmp_path):
    dest = tmp_path / "final"
    ck.publish_dir(lambda p: _weights(p), dest)
    ck.publish_dir(lambda p: (_weights(p), (p / "b").write_text("2")), dest)
    assert sorted(x.name for x in dest.iterdir()) == ["adapter.safetensors", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def _draws() -> tuple[float, float, list[float]]:
    import random

    import numpy as np
    import torch

    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_states_load_without_pickle_and_restore_exactly(tmp_path):
    import torch

    ck.save_checkpoint(tmp_path, 1, _weights, {"step": 1, "rng": [ck.rng_state()]}, {}, keep_last=3)
    expected = _draws()
    _draws()  # move every generator on
    path = tmp_path / "step-00000001"
    # nothing in the file needs an allowlisted global: a plain weights_only load reads it
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path / ck.STATE)) == []
    torch.load(path / ck.STATE, weights_only=True)
    ck.set_rng_state(ck.load_trainer_state(path)["rng"][0])
    assert _draws() == expected


def test_a_checkpoint_of_the_previous_format_still_loads(tmp_path):
    """Before RNG states were tensors, numpy's state was its ``get_state()`` tuple (an ndarray)."""
    import random

    import numpy as np
    import torch

    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    _weights(tmp_path / "step-00000003" / ck.WEIGHTS)
    torch.save({"step": 3, "rng": [legacy]}, tmp_path / "step-00000003" / ck.STATE)
    (tmp_path / "step-00000003" / ck.META).write_text("{}")
    expected = _draws()
    state = ck.load_trainer_state(tmp_path / "step-00000003")
    ck.set_rng_state(state["rng"][0])
    assert state["step"] == 3 and _draws() == expected


class _RunsCode:
    """Unpickling this opens (creates) a file: what a hostile trainer_state.pt could do."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_trainer_state_that_needs_pickle_is_refused_naming_the_file(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "step-00000001"
    _weights(ckpt / ck.WEIGHTS)
    torch.save({"step": 1, "payload": _RunsCode(str(marker))}, ckpt / ck.STATE)
    with pytest.raises(
        BlspError, match=re.escape(f"{ckpt / ck.STATE}: ") + r".*only pickle can load \(io\.open\)"
    ):
        ck.load_trainer_state(ckpt)
    assert not marker.exists()


def test_a_damaged_trainer_state_names_the_file(tmp_path):
    ck.save_checkpoint(tmp_path, 1, _weights, {"step": 1, "rng": [ck.rng_state()]}, {}, keep_last=3)
    state = tmp_path / "step-00000001" / ck.STATE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(BlspError, match=re.escape(f"{state}: not a readable trainer state")):
        ck.load_trainer_state(tmp_path / "step-00000001")
    state.unlink()
    with pytest.raises(BlspError, match=re.escape(f"{state}: trainer state not found")):
        ck.load_trainer_state(tmp_path / "step-00000001")
