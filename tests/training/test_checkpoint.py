"""Checkpoint folders: atomic publication, retention, leftovers of a killed writer."""

from __future__ import annotations

import pytest

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
