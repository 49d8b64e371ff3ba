"""The model card's results, read from a `blsp eval` results.json (stdout: a JSON object).

Each of the issue's bars for the shipped adapter is a row with its measured value and, where the
evaluation gives one, its 95 % bootstrap interval over items; the values are the evaluation's own
numbers, nothing is typed in by hand.

    python docs/results/blsp-base/card_results.py docs/results/blsp-base/eval/results.json [SYSTEM]

SYSTEM is the evaluated system that ships as blsp-base (default: blsp-base itself).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from blsp.evaluation.runner import paired_comparison


def ci(res: dict, key: str) -> str:
    lo_hi = (res.get("ci") or {}).get(key)
    return f"{res[key]:.1f} [{lo_hi[0]:.1f}, {lo_hi[1]:.1f}]" if lo_hi else f"{res[key]:.1f}"


def main(path: str, system: str = "blsp-base") -> None:
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    r = results["results"]
    b, text, casc = r[system], r["Text+LLM"], r["Whisper+LLM"]
    out: dict[str, object] = {}
    for key in [k for k in b if k.startswith("asr@")]:
        out[f"{key} WER through the LLM, blsp-base (%)"] = ci(b[key], "wer")
        out[f"{key} WER, Whisper+LLM cascade (%)"] = ci(casc[key], "wer")
        ratio = paired_comparison(Path(path).parent, results, key, system, "Whisper+LLM", "wer", kind="ratio")
        lo, hi = ratio["ci"]
        out[f"{key} WER ratio blsp-base / cascade, paired interval (bar: <= 2)"] = (
            f"{ratio['ratio']:.2f} [{lo:.2f}, {hi:.2f}]"
        )
        out[f"{key} distinct answers"] = f"{b[key]['distinct_answers']}/{b[key]['n']}"
    for key in [k for k in b if k.startswith("content@")]:
        out[f"{key} matched / shuffled loss (nats/token)"] = (
            f"{b[key]['matched']:.3f} / {b[key]['shuffled']:.3f}"
        )
        lo, hi = b[key]["ci"]["gap"]
        out[f"{key} gap (bar: >= 1.0 nats)"] = f"{b[key]['gap']:.2f} [{lo:.2f}, {hi:.2f}]"
    for key in [k for k in b if k.startswith("align@")]:
        out[f"{key} continuation chrF, speech vs transcript answers (bar: >= 35)"] = ci(b[key], "chrf")
    for key in [k for k in b if k.startswith(("intent@", "sentiment@"))]:
        out[f"{key} off-format rate, blsp-base (%)"] = ci(b[key], "out_of_set_rate")
        out[f"{key} off-format rate, Text+LLM (%) (bar: blsp-base <= this + 15)"] = ci(
            text[key], "out_of_set_rate"
        )
        out[f"{key} accuracy, blsp-base / Text+LLM (%)"] = (
            f"{b[key]['accuracy']:.1f} / {text[key]['accuracy']:.1f}"
        )
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main(*sys.argv[1:3])
