"""``blsp train RECIPE [--set KEY=VALUE ...] [--resume [RUN_OR_CHECKPOINT] [--resume-accept-data-change]]``.

Runs one recipe, a shipped one by name (``blsp train blsp``; ``blsp train --list``) or any YAML
file by path: BLSP adapter training (``ce``/``kl``/``ce+kl``), the ASR-pretraining and CTC
baselines, LoRA fine-tuning, or stage-1 instruction tuning. Under
``accelerate launch --config_file "$(blsp train --path accelerate/ddp)" -m blsp.cli train ...``
(also ``accelerate/fsdp``, ``accelerate/zero2``, ``accelerate/zero3``) it trains on several
processes with DDP, FSDP or DeepSpeed ZeRO (``torchrun --nproc_per_node N``: DDP); see
docs/SCALING.md.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an adapter / baseline / fine-tune from a YAML recipe (`blsp train --list`)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        metavar="RECIPE",
        help="shipped recipe name (e.g. blsp, blsp_default) or path to a YAML recipe",
    )
    p.add_argument(
        "--list", action="store_true", help="list the shipped recipes and accelerate configs, and exit"
    )
    p.add_argument(
        "--path",
        metavar="NAME",
        help="print the file of a shipped recipe or accelerate config (e.g. accelerate/ddp), and exit",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value), e.g. --set train.lr=1e-4; repeatable",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_OR_CHECKPOINT",
        help="continue the run in run.output_dir (or the given run / checkpoint folder) from its last checkpoint",
    )
    p.add_argument(
        "--resume-accept-data-change",
        action="store_true",
        help="with --resume: continue although the training manifests changed since the checkpoint "
        "(by default that is an error naming what changed)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)

    e = sub.add_parser(
        "export",
        help="write a run's adapter (fp16, adapter only) with a model card, ready to ship",
        description="Export the final weights of a run (or its last checkpoint, or one checkpoint folder).",
    )
    e.add_argument("source", help="run folder or checkpoint folder")
    e.add_argument("out", help="folder to write (config.json, adapter.safetensors, README.md)")
    e.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    e.add_argument("--results", help="JSON object of measured results for the model card")
    e.add_argument("--command", default="", help="the command that continues (or repeats) the run")
    e.add_argument("--notes", help="Markdown file added to the model card (data, licences, limitations)")
    e.add_argument(
        "--average-with",
        metavar="FOLDER",
        help="export the weight average of source and this run, checkpoint or adapter folder",
    )
    e.add_argument(
        "--average-weight",
        type=float,
        default=0.5,
        help="the weight of --average-with in the average (default 0.5)",
    )
    e.set_defaults(func=_export)


def _train(args: argparse.Namespace) -> int:
    import json

    from blsp.errors import BlspError
    from blsp.training.config import load_config

    if args.list:
        return _list()
    if args.path:
        from blsp.recipes import recipe_path

        print(recipe_path(args.path))
        return 0
    if args.config is None:
        raise BlspError("give a recipe (a shipped name such as blsp, or a YAML path); see --list")
    if args.resume_accept_data_change and not args.resume:
        raise BlspError("--resume-accept-data-change goes with --resume")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from blsp.training.trainer import train

    summary = train(cfg, resume=args.resume, accept_data_change=args.resume_accept_data_change)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _list() -> int:
    from blsp.recipes import RECIPES_DIR, list_recipes

    recipes, accel = list_recipes(), list_recipes(accelerate=True)
    width = max(len(r.name) for r in recipes + accel) + 2
    print(f"recipes (blsp train NAME; files in {RECIPES_DIR}):")
    for r in recipes:
        print(f"  {r.name:<{width}}{r.summary}")
    print('accelerate configs (accelerate launch --config_file "$(blsp train --path NAME)" ...):')
    for r in accel:
        print(f"  {r.name:<{width}}{r.summary}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from blsp.errors import BlspError
    from blsp.training.export import export_adapter

    results = None
    if args.results:
        try:
            results = json.loads(Path(args.results).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BlspError(f"--results {args.results}: not a readable JSON object ({e})") from e
        if not isinstance(results, dict):
            raise BlspError(f"--results {args.results}: expected a JSON object of metric -> value")
    notes = ""
    if args.notes:
        try:
            notes = Path(args.notes).read_text(encoding="utf-8")
        except OSError as e:
            raise BlspError(f"--notes {args.notes}: cannot read it ({e})") from e
    out = export_adapter(
        args.source,
        args.out,
        dtype=getattr(torch, args.dtype),
        results=results,
        command=args.command,
        notes=notes,
        average_with=args.average_with,
        average_weight=args.average_weight,
    )
    print(out)
    return 0
