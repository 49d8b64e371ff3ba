"""Step-1 throughput: blsp's batched, length-sorted generator vs the original BLSP script's loop.

The original ``data_process/asr_text_generation.py`` of BLSP walks the manifest in file order in
batches of 8, pads each batch to its longest prompt (its ``collate_tokens`` copies each prompt
into the row's tail, i.e. left padding), calls ``generate`` with greedy decoding and 64 new
tokens, and crops the output at the padded input length. The blsp generator sorts all prompts
by length and runs larger batches, either through the same ``generate`` (``static``: left
padding, KV cache, every row runs until the batch's longest response ends) or through its
default ``shrink`` decoding, which computes the prompts' shared head (system prompt, instruction)
once and drops each finished response from the batch and the KV cache.

Both run in one process on the same model and the same prompts (real sentences from
``src/blsp/resources/sentences/train.txt``), one after the other, in a few alternating rounds;
the table reports each one's best round and the agreement of their greedy responses.

    python bench/behave_throughput.py [--n 96] [--batch-size 32] [--max-new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SENTENCES = REPO / "src/blsp/resources/sentences/train.txt"
FALLBACK = REPO.parent / "shared/data/text/harvard/sentences.txt"


def load_sentences(n: int) -> tuple[list[str], Path]:
    path = SENTENCES if SENTENCES.is_file() else FALLBACK
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if len(lines) < n:
        raise SystemExit(f"{path} has only {len(lines)} sentences, fewer than --n {n}")
    return lines[:n], path


def original_loop(model, tokenizer, prompts, stop_ids, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """The original BLSP step-1 loop: file order, batches of 8, pad to the batch max, crop, decode."""
    import torch

    pad = tokenizer.pad_token_id
    responses = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, p in enumerate(batch):  # collate_tokens: res[i][-len(v):] = v
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=stop_ids,
                pad_token_id=pad,
            )
        generated = out[:, width:]  # crop at the padded input length
        responses += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return responses


def blsp_generator(backend, prompts, settings, batch_size: int) -> list[str]:
    """blsp's generator: every prompt sorted by length (longest first), batches of ``batch_size``."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        for i, c in zip(idx, backend.generate([prompts[i] for i in idx], settings), strict=True):
            responses[i] = c.text
    return responses


def main() -> None:
    from blsp.models.hub import DEFAULT_LLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_LLM)
    ap.add_argument("--n", type=int, default=96, help="sentences (default 96)")
    ap.add_argument("--batch-size", type=int, default=32, help="blsp batch size (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    from blsp.behaviors.backends import TransformersBackend, behavior_params
    from blsp.behaviors.job import load_config, text_prompt
    from blsp.instructions import CONTINUATION
    from blsp.models.hub import load_llm
    from blsp.models.prompt import PromptBuilder

    if args.threads:
        torch.set_num_threads(args.threads)
    texts, source = load_sentences(args.n)
    model, tokenizer = load_llm(args.model)
    builder = PromptBuilder.from_config(tokenizer, load_config(None, args.model, None))
    prompts = [text_prompt(builder, CONTINUATION, t) for t in texts]
    stops = builder.stop_token_ids
    static = TransformersBackend(model, tokenizer, stops, batching="static")
    shrink = TransformersBackend(model, tokenizer, stops, batching="shrink")
    settings = behavior_params(max_new_tokens=args.max_new_tokens)
    lengths = sorted(len(p) for p in prompts)
    print(
        f"model {args.model} | {len(prompts)} real sentences from {source.relative_to(source.parents[2])} | "
        f"prompt tokens {lengths[0]}-{lengths[-1]} (median {lengths[len(lengths) // 2]}) | "
        f"greedy, {args.max_new_tokens} new tokens | torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    for b in (static, shrink):  # warm-up
        blsp_generator(b, prompts[:2], behavior_params(max_new_tokens=4), 2)

    runs = {
        "original: file order, batch 8": lambda: original_loop(
            model, tokenizer, prompts, stops, args.max_new_tokens
        ),
        "blsp static: sorted, batch 8": lambda: blsp_generator(static, prompts, settings, 8),
        f"blsp static: sorted, batch {args.batch_size}": lambda: blsp_generator(
            static, prompts, settings, args.batch_size
        ),
        "blsp shrink: sorted, batch 8": lambda: blsp_generator(shrink, prompts, settings, 8),
        f"blsp shrink: sorted, batch {args.batch_size} (default)": lambda: blsp_generator(
            shrink, prompts, settings, args.batch_size
        ),
    }
    best: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            dt = time.perf_counter() - t0
            best[name] = min(best.get(name, dt), dt)
            print(f"  round {r + 1}: {name:<44} {dt:8.1f} s")
    base_name = next(iter(runs))
    base = best[base_name]
    print()
    print(f"{'generator':<44} {'seconds':>8} {'responses/s':>12} {'speed-up':>9} {'same responses':>15}")
    for name in runs:
        same = sum(a == b for a, b in zip(outputs[name], outputs[base_name], strict=True))
        print(
            f"{name:<44} {best[name]:8.1f} {len(prompts) / best[name]:12.2f} {base / best[name]:8.2f}x "
            f"{same:>8}/{len(prompts)}"
        )


if __name__ == "__main__":
    main()
