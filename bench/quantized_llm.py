"""The frozen LLM in int8 against fp32 on CPU, side by side in one run: time to first token,
decode tokens/s, and the quality drift, with the shipped adapter on held-out real speech.

Both models are loaded once (``BlspModel.from_pretrained(quantization=...)``: ``int8`` is torch's
dynamic int8 quantization of every linear layer of the LLM, the encoder and adapter stay fp32);
the clips alternate between them so that any background load hits both alike.

- TTFT: one clip, ``max_new_tokens=1`` (features, encoder, adapter, prefill, first token).
- tokens/s: greedy answers of up to ``--max-new-tokens``, generated tokens over wall time.
- quality: repetition WER of each against the transcripts, and the drift: WER and chrF of the
  int8 answers against the fp32 answers (0 and 100 if they are the same).

    python bench/quantized_llm.py                 # 16 speechocean762 test clips
    python bench/quantized_llm.py --clips 8 --adapter runs/blsp/final
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def clips(n: int) -> list[tuple[object, str]]:
    from blsp.data.audio import load_audio
    from blsp.data.normalize import lower

    folder = SHARED / "speech" / "speechocean762"
    if not (folder / "test.jsonl").is_file():
        raise SystemExit(f"{folder / 'test.jsonl'} not found: this bench needs ../shared/data")
    rows = [json.loads(x) for x in (folder / "test.jsonl").read_text().splitlines()]
    rows = rows[1 :: max(1, len(rows) // n)][:n]  # every k-th test clip, offset from the test's own
    return [(load_audio(folder / r["audio"]), lower(r["text"])) for r in rows]


def timed(model, audio, max_new_tokens: int) -> tuple[float, list[int]]:
    from blsp.instructions import REPETITION
    from blsp.models.prompt import make_conversation

    conv = [{"conversation": make_conversation(REPETITION, audio=audio)}]
    t0 = time.perf_counter()
    ids = model.generate(conv, max_new_tokens=max_new_tokens, return_ids=True)[0]
    return time.perf_counter() - t0, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=None, help="adapter folder (default: the shipped blsp-base)")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    from blsp.evaluation.metrics import chrf, wer
    from blsp.models.modeling_blsp import BlspModel

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = clips(args.clips)
    models = {
        q or "fp32": BlspModel.from_pretrained(args.adapter, device="cpu", quantization=q)
        for q in (None, "int8")
    }
    for m in models.values():  # warm-up: first-call allocations and kernel selection
        timed(m, data[0][0], 4)
    ttft: dict[str, list[float]] = {k: [] for k in models}
    rate: dict[str, list[float]] = {k: [] for k in models}
    answers: dict[str, list[str]] = {k: [] for k in models}
    for audio, _ in data:
        for name, m in models.items():
            ttft[name].append(timed(m, audio, 1)[0])
            wall, ids = timed(m, audio, args.max_new_tokens)
            rate[name].append(len(ids) / wall)
            answers[name].append(m.tokenizer.decode(ids, skip_special_tokens=True).strip())
    refs = [t for _, t in data]
    print(
        f"{len(data)} speechocean762 test clips, shipped adapter, greedy, up to {args.max_new_tokens} tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'':8} {'TTFT p50 s':>11} {'tokens/s p50':>13} {'WER %':>7}")
    for name in models:
        print(
            f"{name:8} {statistics.median(ttft[name]):11.3f} {statistics.median(rate[name]):13.1f} "
            f"{wer(refs, answers[name]):7.1f}"
        )
    print(
        f"ratio int8/fp32: TTFT {statistics.median(ttft['int8']) / statistics.median(ttft['fp32']):.2f}x, "
        f"tokens/s {statistics.median(rate['int8']) / statistics.median(rate['fp32']):.2f}x"
    )
    same = sum(a == b for a, b in zip(answers["fp32"], answers["int8"], strict=True))
    print(
        f"drift of int8 against fp32 answers: WER {wer(answers['fp32'], answers['int8']):.1f} %, "
        f"chrF {chrf(answers['int8'], answers['fp32']):.1f}, identical {same}/{len(data)}"
    )


if __name__ == "__main__":
    main()
