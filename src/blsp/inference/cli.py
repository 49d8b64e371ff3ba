"""``blsp generate`` (batch answers for a manifest) and ``blsp chat`` (terminal conversation)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model arguments of chat, generate and serve: adapter, --device, --dtype, --quantization."""
    p.add_argument(
        "adapter",
        nargs="?",
        default=None,
        help="BLSP adapter folder (config.json + adapter.safetensors) or shipped name (default: blsp-base)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument(
        "--quantization",
        default=None,
        choices=["int8", "bnb-8bit", "bnb-4bit"],
        help="run the frozen LLM quantized: int8 on CPU (bench/quantized_llm.py), bnb-* on CUDA",
    )


def _gen_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="answer length limit in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's setting)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument(
        "--no-loop-guard",
        dest="loop_guard",
        action="store_false",
        help="do not end an answer that falls into a loop (a short span repeated back to back)",
    )
    p.add_argument("--max-audio-seconds", type=float, default=None, help="refuse clips longer than this")


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="answer an instruction for every clip of a manifest (batched, resumable)",
        description=(
            "Run the model on every line of a JSON Lines manifest ({id, audio, [instruction], ...}) and "
            "append {..., instruction, response} to OUT. Rerunning resumes: ids already in OUT are skipped. "
            "Lines with unreadable audio are skipped with the path and reason, and counted."
        ),
    )
    add_model_args(g)
    g.add_argument(
        "manifest", help="JSON Lines: id, audio (path relative to the manifest), optional instruction"
    )
    g.add_argument("out", help="output JSON Lines (appended; resumable)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--instruction", help="instruction for lines without their own 'instruction' field")
    which.add_argument("--task", help="paper task instruction: asr, st:German, snips, fsc, sentiment")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--audio-key", default="audio", help="manifest field holding the audio path")
    _gen_args(g, 128)
    add_backend_args(g)
    g.set_defaults(func=_generate)

    c = sub.add_parser(
        "chat",
        help="talk to the model in the terminal: text turns and audio turns (/audio PATH), KV cache kept",
        description="Multi-turn chat. Type text, or `/audio PATH [instruction]`, or `/mic [SECONDS] "
        "[instruction]` (needs the sounddevice package). /help lists the commands.",
    )
    add_model_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="positions the conversation may use (default: the LLM's context window); "
        "older turns are dropped beyond it",
    )
    c.add_argument("--no-stream", action="store_true", help="print each answer when it is complete")
    c.add_argument("--no-cache", action="store_true", help="recompute the whole conversation every turn")
    c.add_argument("--mic-seconds", type=float, default=5.0, help="default /mic recording length")
    _gen_args(c, 256)
    c.set_defaults(func=_chat)


def pipeline_from_args(args: argparse.Namespace, **kwargs):
    """The ``SpeechPipeline`` that :func:`add_model_args` and ``--max-audio-seconds`` name (``kwargs``: its settings)."""
    from blsp.inference.audio_input import AudioLimits
    from blsp.inference.pipeline import SpeechPipeline

    return SpeechPipeline.from_pretrained(
        args.adapter,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        limits=AudioLimits(max_seconds=args.max_audio_seconds),
        **kwargs,
    )


def _pipeline(args: argparse.Namespace):
    return pipeline_from_args(
        args,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        loop_guard=args.loop_guard,
    )


def _generate(args: argparse.Namespace) -> int:
    from blsp.errors import BlspError
    from blsp.inference.generate import run_generate_job

    instruction = args.instruction
    if args.task:
        from blsp.instructions import task_instruction

        instruction = task_instruction(args.task)
    if args.batch_size < 1:
        raise BlspError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.backend == "vllm":
        from blsp.inference.vllm_engine import import_vllm

        import_vllm()  # a clear error before the model loads
    pipe = _pipeline(args)
    generate = None
    if args.backend == "vllm":  # blsp embeds each batch; vLLM decodes it
        from blsp.inference.vllm_engine import VllmGenerator

        generate = VllmGenerator(pipe.model, backend_kwargs(args, pipe.model)).generate_prepared
    stats = run_generate_job(
        pipe.model,
        args.manifest,
        args.out,
        instruction=instruction,
        params=pipe.params(stop=args.stop),
        batch_size=args.batch_size,
        limits=pipe.limits,
        audio_key=args.audio_key,
        progress=sys.stderr.isatty(),
        generate=generate,
    )
    print(
        f"generate: {stats.written} written, {stats.done_before} already done, {stats.skipped} skipped "
        f"(of {stats.total} lines) -> {args.out}",
        file=sys.stderr,
    )
    for err in stats.errors[:20]:
        print(f"  skipped: {err}", file=sys.stderr)
    if len(stats.errors) > 20:
        print(f"  ... and {len(stats.errors) - 20} more", file=sys.stderr)
    return 0 if stats.written + stats.done_before > 0 or stats.total == 0 else 1


def _chat(args: argparse.Namespace) -> int:
    from blsp.inference.chat import ChatSession, run_terminal_chat

    pipe = _pipeline(args)
    session = ChatSession(pipe, system=args.system, max_context=args.max_context, use_cache=not args.no_cache)
    return run_terminal_chat(session, stream=not args.no_stream, mic_seconds=args.mic_seconds, stop=args.stop)


# --backend vllm (blsp generate, blsp serve): flags only here, so that --help does not import torch
BACKENDS = ("transformers", "vllm")


def add_backend_args(p: Any) -> None:
    """``--backend`` and the vLLM options of ``blsp generate`` and ``blsp serve``."""
    p.add_argument(
        "--backend",
        default="transformers",
        choices=BACKENDS,
        help="what decodes: transformers (blsp's own loop) or vllm (blsp embeds, vLLM runs the LLM; "
        "pip install vllm, CUDA GPU)",
    )
    g = p.add_argument_group("--backend vllm")
    g.add_argument(
        "--vllm-llm", default=None, help="LLM folder or hub id vLLM loads (default: the adapter's LLM)"
    )
    g.add_argument("--vllm-gpu-memory", type=float, default=0.6, help="vLLM's share of the GPU memory")
    g.add_argument("--vllm-max-model-len", type=int, default=None, help="vLLM's context length")
    g.add_argument("--vllm-tensor-parallel", type=int, default=1, help="GPUs vLLM shards the LLM over")
    g.add_argument("--vllm-seed", type=int, default=0, help="seed of vLLM's sampling")


def backend_kwargs(args: Any, model: Any) -> dict[str, Any]:
    """``vllm_engine.engine_kwargs`` from the options of :func:`add_backend_args`."""
    from blsp.inference.vllm_engine import engine_kwargs
    from blsp.models.hub import resolve_adapter

    return engine_kwargs(
        model,
        adapter_dir=resolve_adapter(args.adapter),
        llm=args.vllm_llm,
        seed=args.vllm_seed,
        gpu_memory_utilization=args.vllm_gpu_memory,
        max_model_len=args.vllm_max_model_len,
        tensor_parallel_size=args.vllm_tensor_parallel,
    )
