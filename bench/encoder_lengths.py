"""Variable-length Whisper encoder vs the same encoder padded to 30 s, side by side in one run.

    .venv/bin/python bench/encoder_lengths.py [--encoder whisper-base] [--batch 8] [--seconds 5]

Prints the time per batch of each and the ratio. Both paths encode the same clips with the same
weights; the padded path is what the original BLSP code did (every clip padded to 30 s and the
encoder attending over the padding).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    from blsp.models.hub import DEFAULT_WHISPER

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default=DEFAULT_WHISPER)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from blsp.models.encoder import SpeechEncoder
    from blsp.models.hub import load_whisper

    whisper, processor = load_whisper(args.encoder)
    fe = processor.feature_extractor
    enc = SpeechEncoder(whisper.get_encoder(), fe).eval()
    rng = np.random.default_rng(0)
    clips = [
        (0.1 * rng.standard_normal(int(args.seconds * 16000))).astype(np.float32) for _ in range(args.batch)
    ]

    feats = [enc.features(c) for c in clips]
    lengths = torch.tensor([f.shape[-1] for f in feats])
    x = torch.stack(feats)
    padded = fe(clips, sampling_rate=16000, return_tensors="pt").input_features  # [B, 80, 3000]

    with torch.inference_mode():
        t_var = _timeit(lambda: enc(x, lengths), args.repeats)
        t_pad = _timeit(lambda: whisper.get_encoder()(padded), args.repeats)

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"encoder {args.encoder}, batch of {args.batch} clips of {args.seconds:g} s")
    print(f"{'path':<28}{'frames':>8}{'s/batch':>10}{'clips/s':>10}")
    print(f"{'variable length (blsp)':<28}{int(lengths.max()):>8}{t_var:>10.3f}{args.batch / t_var:>10.1f}")
    print(f"{'padded to 30 s (original)':<28}{padded.shape[-1]:>8}{t_pad:>10.3f}{args.batch / t_pad:>10.1f}")
    print(f"speed-up: {t_pad / t_var:.1f}x")


if __name__ == "__main__":
    main()
