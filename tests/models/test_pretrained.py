"""The shipped adapter: how it is found and what a damaged install says."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from blsp.errors import ModelLoadError
from blsp.models import hub
from blsp.models.modeling_blsp import BlspModel


@pytest.fixture
def shipped_root(tmp_path, monkeypatch):
    """Point the shipped-adapter folder at an empty temporary one."""
    root = tmp_path / "pretrained"
    monkeypatch.setattr(hub, "pretrained_adapter_dir", lambda name=hub.DEFAULT_ADAPTER: root / name)
    return root


def test_the_default_adapter_is_the_shipped_one():
    folder = hub.resolve_adapter(None)
    assert folder == hub.resolve_adapter("blsp-base") == hub.pretrained_adapter_dir()
    assert hub.is_pretrained_adapter(folder) and not hub.is_pretrained_adapter(folder.parents[3])
    assert [r["name"] for r in hub.pretrained_status() if r["installed"]] == ["blsp-base"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["encoder"], config["llm"]) == ("whisper-base", "smollm2-135m-instruct")
    state = load_file(str(folder / "adapter.safetensors"))
    assert all(k.startswith("adapter.") for k in state)  # adapter only
    assert sum(v.numel() * v.element_size() for v in state.values()) < 40 * 2**20  # tens of MB at most


def test_a_missing_or_corrupted_shipped_adapter_says_which_file_and_how_to_get_it_back(
    shipped_root, tiny_model
):
    with pytest.raises(ModelLoadError, match=r"pretrained/blsp-base/config.json.*reinstall blsp"):
        BlspModel.from_pretrained(None, device="cpu")
    folder = shipped_root / "blsp-base"
    tiny_model.save_pretrained(folder)
    (folder / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"blsp-base/adapter.safetensors: cannot read.*reinstall blsp"):
        BlspModel.from_pretrained("blsp-base", device="cpu")
    (folder / "adapter.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"adapter.safetensors: missing from the shipped adapter"):
        BlspModel.from_pretrained(device="cpu")
    # a folder of one's own gets no reinstall advice
    own = shipped_root.parent / "mine"
    tiny_model.save_pretrained(own)
    (own / "adapter.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError) as e:
        BlspModel.from_pretrained(own, device="cpu")
    assert "reinstall" not in str(e.value)


def test_commands_that_talk_to_a_model_default_to_the_shipped_adapter():
    from blsp.cli import build_parser

    p = build_parser()
    for argv in (
        ["chat"],
        ["serve", "--port", "9000"],
        ["ui"],
        ["generate", "in.jsonl", "out.jsonl", "--task", "asr"],
    ):
        assert p.parse_args(argv).adapter is None, argv  # None: BlspModel.from_pretrained's shipped default
    args = p.parse_args(["generate", "runs/x/final", "in.jsonl", "out.jsonl", "--task", "asr"])
    assert (args.adapter, args.manifest, args.out) == ("runs/x/final", "in.jsonl", "out.jsonl")
