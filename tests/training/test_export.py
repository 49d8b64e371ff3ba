"""``blsp export``: a run's adapter as an fp16 folder with a model card written from the run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blsp.errors import BlspError
from blsp.models.modeling_blsp import BlspModel


def test_export_writes_an_fp16_adapter_and_a_model_card_from_the_run(tiny_recipe, tiny_manifests, tmp_path):
    from blsp.training.config import config_from_dict
    from blsp.training.export import export_adapter
    from blsp.training.trainer import train

    rec = tiny_recipe(
        data={
            "train": [{"path": str(tiny_manifests["train"])}],
            "eval": [{"path": str(tiny_manifests["eval"])}],
        },
        run={"output_dir": str(tmp_path / "run"), "save_every": 2, "eval_every": 2, "progress": False},
    )
    summary = train(config_from_dict(rec))
    out = export_adapter(
        tmp_path / "run",
        tmp_path / "shipped",
        results={"repetition WER": 0.5},
        command="blsp train x.yaml --resume",
        notes="## Data\n\nsome clips, CC BY 4.0",
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter.safetensors",
        "config.json",
        "training_state.json",
    ]
    state = load_file(str(out / "adapter.safetensors"))
    assert state and all(v.dtype == torch.float16 for v in state.values())
    card = (out / "README.md").read_text()
    assert "| step | matched | shuffled | gap |" in card and "| 4 |" in card
    assert (
        "blsp train x.yaml --resume" in card
        and "## Data\n\nsome clips, CC BY 4.0" in card
        and "| repetition WER | 0.500 |" in card
    )
    assert f"samples seen: {summary['samples']}" in card
    assert json.loads((out / "training_state.json").read_text())["step"] == 4
    # the fp16 export loads and gives the run's outputs up to fp16 rounding
    final = BlspModel.from_pretrained(tmp_path / "run" / "final", device="cpu")
    shipped = BlspModel.from_pretrained(out, device="cpu")
    for k, v in final.adapter.state_dict().items():
        torch.testing.assert_close(shipped.adapter.state_dict()[k], v, rtol=2e-3, atol=2e-3)
    # an interrupted run exports its last checkpoint
    ckpt = export_adapter(tmp_path / "run" / "checkpoints" / "step-00000002", tmp_path / "early")
    assert json.loads((ckpt / "training_state.json").read_text())["step"] == 2
    early = (ckpt / "README.md").read_text()
    assert "| 2 |" in early and "| 4 |" not in early  # its card stops at its own step
    # a weight average of the final weights and the step-2 checkpoint, said so on the card
    soup = export_adapter(
        tmp_path / "run", tmp_path / "soup", dtype=torch.float32, average_with=ckpt, average_weight=0.25
    )
    a = load_file(str(tmp_path / "run" / "final" / "adapter.safetensors"))
    b = load_file(str(ckpt / "adapter.safetensors"))
    mixed = load_file(str(soup / "adapter.safetensors"))
    assert mixed.keys() == b.keys()
    for k, v in mixed.items():
        torch.testing.assert_close(v, 0.75 * a[k].float() + 0.25 * b[k].float(), rtol=1e-3, atol=1e-3)
    assert "## Weight average" in (soup / "README.md").read_text()
    assert BlspModel.from_pretrained(soup, device="cpu") is not None
    with pytest.raises(BlspError, match=r"average weight must be in \[0, 1\]"):
        export_adapter(tmp_path / "run", tmp_path / "bad", average_with=ckpt, average_weight=1.5)
    wrong = {k: torch.zeros(3) for k in b}
    (tmp_path / "other").mkdir()
    save_file(wrong, str(tmp_path / "other" / "adapter.safetensors"))
    with pytest.raises(BlspError, match="cannot average"):
        export_adapter(tmp_path / "run", tmp_path / "bad", average_with=tmp_path / "other")


def test_learning_curve_adds_up_runs_and_plots_the_gap(tiny_recipe, tiny_manifests, tmp_path):
    from blsp.evaluation.progress import learning_curve
    from blsp.training.config import config_from_dict
    from blsp.training.trainer import train

    data = {
        "train": [{"path": str(tiny_manifests["train"])}],
        "eval": [{"path": str(tiny_manifests["eval"])}],
    }
    run = {"save_every": 2, "eval_every": 2, "eval_at_start": True, "progress": False}
    warm = tiny_recipe(
        data=data,
        train={"objective": "ctc", "max_steps": 2},
        ctc={"upsample": 2},
        run={**run, "output_dir": str(tmp_path / "ctc")},
    )
    first = train(config_from_dict(warm))
    rec = tiny_recipe(data=data, run={**run, "output_dir": str(tmp_path / "ce")})
    rec["model"]["init_from"] = str(tmp_path / "ctc" / "final")
    second = train(config_from_dict(rec))
    res = learning_curve([tmp_path / "ctc", tmp_path / "ce"], tmp_path / "curve")
    pts = res["points"]
    assert [p["step"] for p in pts] == [0, 2, 4]  # the CTC run's losses are not LLM gaps
    assert (
        pts[0]["samples"] == first["samples"] and pts[-1]["samples"] == first["samples"] + second["samples"]
    )
    assert pts[-1]["cpu_hours"] == pytest.approx((first["train_time_s"] + second["train_time_s"]) / 3600)
    assert all(p["gap"] == pytest.approx(p["shuffled"] - p["loss"]) for p in pts)
    assert (tmp_path / "curve" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
