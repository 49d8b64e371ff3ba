"""``blsp behave``: BLSP step 1 (behavior data) and ``blsp behave merge`` (join shards)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from blsp.behaviors.backends import behavior_params
from blsp.behaviors.job import BehaveOptions
from blsp.models.hub import DEFAULT_LLM

DESCRIPTION = """\
Step 1 of BLSP: prompt the LLM with `instruction + transcript` for every manifest line and keep
its response as the step-2 target. The prompt is the training-time text-path prompt (same
PromptBuilder). Output is appended per batch; a rerun resumes. Sidecars: OUT.rejected.jsonl
(filtered responses, skipped inputs), OUT.failed.jsonl (backend errors, retried by a rerun),
OUT.summary.json. `merge` joins the shards of a sharded run (--num-shards, or torchrun)."""


def register(sub: argparse._SubParsersAction) -> None:
    from blsp.cli import set_default_subcommand

    group = sub.add_parser(
        "behave",
        help="generate behavior data (BLSP step 1); `behave merge` joins shards",
        usage="blsp behave [run] MANIFEST OUT.jsonl [options]\n       blsp behave merge SHARD.jsonl ... -o OUT.jsonl",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = group.add_subparsers(dest="behave_command", metavar="SUBCOMMAND", prog="blsp behave")
    set_default_subcommand(group, "run")
    p = cmds.add_parser(
        "run",
        help="(the default) generate behavior data: blsp behave MANIFEST OUT.jsonl [options]",
        usage='blsp behave [run] MANIFEST OUT.jsonl [--behavior continuation|repetition|"<instruction>"] '
        "[options]",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", metavar="MANIFEST", help="speech manifest (JSON Lines with transcripts)")
    p.add_argument("out", metavar="OUT.jsonl", help="behavior data to write (appended; a rerun resumes)")
    g = p.add_argument_group("behavior")
    g.add_argument(
        "--behavior",
        default=BehaveOptions.behavior,
        help="continuation (paper Table 1, default), repetition (response = transcript, no generation) "
        "or a free instruction sentence in quotes",
    )
    g.add_argument("--name", help="label written as `behavior` for a free instruction (default: custom)")
    g.add_argument(
        "--text-field",
        default=BehaveOptions.text_field,
        help="manifest field holding the transcript (default: %(default)s)",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=BehaveOptions.max_prompt_tokens,
        help="skip longer prompts (default: %(default)s)",
    )
    g.add_argument(
        "--echo",
        choices=("drop", "flag"),
        help="responses that only repeat the transcript: drop (default for continuation) or keep flagged "
        "(default for free instructions)",
    )
    g.add_argument("--limit", type=int, help="process at most this many pending lines (a trial run)")
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        help=f"LLM reference (alias, HF folder, .gguf; default: {DEFAULT_LLM} or --config's)",
    )
    m.add_argument("--config", help="BLSP model folder or config.json whose LLM and prompt settings to use")
    m.add_argument(
        "--prompt-template", choices=("auto", "chat", "paper"), help="prompt template (default: auto)"
    )
    m.add_argument("--backend", choices=("transformers", "vllm", "http"), default=BehaveOptions.backend)
    m.add_argument(
        "--batching",
        choices=("shrink", "static"),
        default=BehaveOptions.batching,
        help="transformers backend: shrink (default: finished responses leave the batch and its KV cache "
        "at once) or static (one model.generate per batch; all rows run until the longest ends)",
    )
    m.add_argument(
        "--batch-size", type=int, help="prompts per batch (default: 32 transformers, 512 vllm, 64 http)"
    )
    m.add_argument(
        "--device",
        default=BehaveOptions.device,
        help="transformers device (default: cuda:$LOCAL_RANK if any, else cpu)",
    )
    m.add_argument("--dtype", default=BehaveOptions.dtype, choices=("auto", "float32", "bfloat16", "float16"))
    d = p.add_argument_group("decoding (greedy by default)")
    d.add_argument("--max-new-tokens", type=int, default=behavior_params().max_new_tokens)
    d.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy (the default, the paper's setting); above 0 samples at that temperature",
    )
    d.add_argument(
        "--do-sample", action="store_true", help="sample: at --temperature, or 1.0 when it is not given"
    )
    d.add_argument("--top-p", type=float, default=behavior_params().top_p)
    d.add_argument("--seed", type=int, help="sampling seed (each batch derives its own from it)")
    s = p.add_argument_group("sharding")
    s.add_argument(
        "--num-shards", type=int, help="split the manifest in N shards (default: torchrun's WORLD_SIZE)"
    )
    s.add_argument("--shard-index", type=int, help="which shard this run does (default: torchrun's RANK)")
    h = p.add_argument_group("http backend (OpenAI-compatible /v1/completions)")
    h.add_argument("--endpoint", help="server URL, e.g. http://localhost:8000/v1")
    h.add_argument("--served-model", help="model name sent to the server (default: --model)")
    h.add_argument("--tokenizer", help="LLM reference for the local tokenizer/prompt (default: --model)")
    h.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    h.add_argument(
        "--concurrency",
        type=int,
        default=BehaveOptions.concurrency,
        help="requests in flight (default: %(default)s)",
    )
    h.add_argument(
        "--timeout",
        type=float,
        default=BehaveOptions.timeout,
        help="seconds per request (default: %(default)s)",
    )
    h.add_argument(
        "--retries",
        type=int,
        default=BehaveOptions.retries,
        help="retries after an error or timeout (default: %(default)s)",
    )
    h.add_argument(
        "--backoff",
        type=float,
        default=BehaveOptions.backoff,
        help="first retry delay in seconds, doubled each retry (default: %(default)s)",
    )
    h.add_argument(
        "--prompt-format",
        choices=("ids", "text"),
        default=BehaveOptions.prompt_format,
        help="send the prompt as token ids (exact, default) or as the rendered text",
    )
    h.add_argument(
        "--extra-body", help="JSON object merged into each request, e.g. '{\"stop_token_ids\": [2]}'"
    )
    p.set_defaults(func=_behave)

    m = cmds.add_parser(
        "merge",
        help="join the shards of a sharded run (--num-shards, or torchrun) into one file",
        description="Join the shard files of a sharded `blsp behave` run; with --manifest, report the "
        "manifest ids that are in no shard (exit code 1).",
    )
    m.add_argument("shards", nargs="+", metavar="SHARD.jsonl", help="the shard files to join")
    m.add_argument("-o", "--output", required=True, help="the merged output file")
    m.add_argument("--manifest", help="the manifest, to report ids that are missing")
    m.add_argument(
        "--text-field",
        default=BehaveOptions.text_field,
        help="manifest field holding the transcript (default: %(default)s)",
    )
    m.set_defaults(func=_merge)


def settings_from_args(args: argparse.Namespace) -> Any:
    """The ``GenerationParams`` of ``blsp behave``'s decoding flags (temperature 0 = greedy, as every
    blsp command; ``--do-sample`` samples at ``--temperature``, 1.0 when it is not given)."""
    from blsp.behaviors.backends import behavior_params

    return behavior_params(
        do_sample=True if args.do_sample else None,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        top_p=args.top_p,
        seed=args.seed,
    )


def _behave(args: argparse.Namespace) -> int:
    from blsp.behaviors.backends import parse_extra_body
    from blsp.behaviors.job import BehaveOptions, run_behave

    settings = settings_from_args(args)
    opts = BehaveOptions(
        manifest=Path(args.manifest),
        out=Path(args.out),
        behavior=args.behavior,
        name=args.name,
        text_field=args.text_field,
        model=args.model,
        config=args.config,
        prompt_template=args.prompt_template,
        backend=args.backend,
        batching=args.batching,
        batch_size=args.batch_size,
        settings=settings,
        max_prompt_tokens=args.max_prompt_tokens,
        echo=args.echo,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        device=args.device,
        dtype=args.dtype,
        limit=args.limit,
        endpoint=args.endpoint,
        served_model=args.served_model,
        tokenizer=args.tokenizer,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
        prompt_format=args.prompt_format,
        extra_body=parse_extra_body(args.extra_body),
    )
    summary = run_behave(opts)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["shard"]["count"] > 1:
        print(
            f"shard {summary['shard']['index']} of {summary['shard']['count']} written to {summary['output']}; "
            f"join the shards with: blsp behave merge <shards> -o {args.out} --manifest {args.manifest}",
            file=sys.stderr,
        )
    if summary["failed"]:
        print(f"{summary['failed']} lines failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _merge(args: argparse.Namespace) -> int:
    from blsp.behaviors.merge import merge_shards

    report = merge_shards(args.shards, args.output, manifest=args.manifest, text_field=args.text_field)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if report.get("missing"):
        print(
            f"{report['missing']} manifest ids are in no shard (first: {report['missing_ids'][:5]})",
            file=sys.stderr,
        )
        return 1
    return 0
