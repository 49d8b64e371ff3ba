"""The held-out WER bar as a ratio with an interval: a system's WER over the Whisper+LLM cascade's on
the same clips, per `blsp eval` run and pooled over runs (stdout: a Markdown table).

    python docs/results/blsp-base/wer_ratio.py SYSTEM [NAME=]RUN_DIR:TASK_KEY [...]

Each RUN_DIR is a `blsp eval --out` folder (results.json and outputs/); TASK_KEY an asr task in it
(e.g. asr@tts-asr-en); NAME the system's name in that run where it is not SYSTEM. The ratio is
sum(errors) / sum(errors of the cascade) over the shared items, and its 95 % interval comes from
resampling those items with replacement (both systems together, `blsp.evaluation.stats.paired_ratio`).
Pooled rows key each item by its run, so runs over different clips add up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from blsp.evaluation import stats
from blsp.evaluation.runner import output_pairs

CASCADE = "Whisper+LLM"


def main(system: str, *runs: str) -> None:
    pooled: tuple[dict, dict] = ({}, {})
    print(f"| clips | n | {system} WER % | cascade WER % | ratio [95 % interval] |")
    print("|---|---|---|---|---|")

    def row(name: str, a: dict, b: dict) -> None:
        r = stats.paired_ratio(a, b)
        wer = [100 * sum(x[0] for x in p.values()) / sum(x[1] for x in p.values()) for p in (a, b)]
        print(
            f"| {name} | {r['n']} | {wer[0]:.1f} | {wer[1]:.1f} | {r['ratio']:.2f} {stats.fmt_ci(r['ci'], 2)} |"
        )

    for spec in runs:
        name, _, where = spec.rpartition("=")
        folder, key = where.rsplit(":", 1)
        results = json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))
        a, b = (output_pairs(folder, results, key, s, "wer") for s in (name or system, CASCADE))
        row(f"`{Path(folder).name}` {key}", a, b)
        for mine, got in zip(pooled, (a, b), strict=True):
            mine.update({f"{spec}/{k}": v for k, v in got.items()})
    if len(runs) > 1:
        row("pooled", *pooled)


if __name__ == "__main__":
    main(*sys.argv[1:])
