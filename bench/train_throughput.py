"""Training throughput: this trainer, the same trainer as it was before its fast path, and an
original-style loop, same models and data, side by side in one run.

"original" re-creates the loop of cwang621/blsp's stage 2: every clip padded to 30 s of log-mel
and encoded in full (the encoder attends over the padding), the adapter over all 1500 frames, the
LLM fed prefix | 188 speech slots (padding masked) | suffix, each part padded separately, random
batches (no length grouping), and the encoder run again on every step (no cache).
"old" is ``blsp.training.trainer.train`` as it was: unpadded clips, length-grouped batches, the
frozen encoder's outputs cached on disk (epoch 1 fills the cache, later epochs read it), logits only
at target positions, fp32 (``train.precision=fp32 train.shared_head=false``).
"new" is the same trainer with its defaults: the rows' shared head (system prompt, instruction)
run once a batch without gradient and its KV reused, and the frozen LLM's matmuls in bf16 on
CPUs with bf16 instructions (the adapter and AdamW stay fp32). The loss of the first step is
printed for each, so the fp32 paths can be seen to agree and bf16 to stay close.

Both use AdamW on the adapter with the same batch size. Each runs in its own child process so
that its peak resident memory (``getrusage``) is its own; "+RSS" is the peak minus the resident
memory right after the models were loaded (i.e. what training itself added).

    python bench/train_throughput.py                      # whisper-base + SmolLM2-135M-Instruct
    python bench/train_throughput.py --clips 16 --epochs 2 --micro-batch 8
    python bench/train_throughput.py --manifest my.jsonl  # any manifest with audio + text
    python bench/train_throughput.py --tiny               # tiny random models (a quick check)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish, and rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck, and the hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell, so the clerk kept a few pairs in the back of the shop.",
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------- data
def make_manifest(args: argparse.Namespace, folder: Path) -> Path:
    """A repetition behavior manifest (response = transcript, no generation needed)."""
    from blsp.instructions import REPETITION

    rows = []
    if args.manifest:
        from blsp.data.manifest import load_manifest, resolve_audio_path

        items = [x for x in load_manifest(args.manifest) if x.get("text")]
        src_dir = Path(args.manifest).resolve().parent
        step = max(1, len(items) // args.clips)
        for x in items[::step][: args.clips]:
            rows.append({**x, "audio": resolve_audio_path(x["audio"], src_dir)})
    else:
        if shutil.which("espeak-ng") is None:
            raise SystemExit("no --manifest, no shared data and no espeak-ng: nothing to train on")
        from blsp.data.audio import audio_info

        for i in range(args.clips):
            text = SENTENCES[i % len(SENTENCES)]
            wav = folder / f"clip{i:03d}.wav"
            speed = 130 + 10 * (i % 5)
            subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(wav), text], check=True)
            rows.append(
                {"id": f"clip{i:03d}", "audio": str(wav), "text": text, "duration": audio_info(wav).duration}
            )
    out = folder / "behaviors.jsonl"
    with open(out, "w") as f:
        for r in rows:
            text = r["text"].lower() if r["text"].isupper() else r["text"]
            f.write(
                json.dumps(
                    {
                        "id": str(r["id"]),
                        "audio": r["audio"],
                        "text": text,
                        "duration": r["duration"],
                        "behavior": "repetition",
                        "instruction": REPETITION,
                        "response": text,
                    }
                )
                + "\n"
            )
    return out


def tiny_models(folder: Path) -> tuple[str, str]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(0)
    wdir, ldir = folder / "whisper", folder / "llm"
    WhisperForConditionalGeneration(
        WhisperConfig(
            vocab_size=64,
            num_mel_bins=80,
            d_model=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            decoder_layers=1,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_source_positions=1500,
            max_target_positions=32,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).save_pretrained(wdir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(wdir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [s.lower() for s in SENTENCES] * 4,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    fast.save_pretrained(ldir)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(fast),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
        )
    ).save_pretrained(ldir)
    return str(wdir), str(ldir)


# --------------------------------------------------------------------------- workers
VARIANTS = {
    "old": {"precision": "fp32", "shared_head": False},
    "new": {},  # the trainer's defaults
}


def run_ours(args: argparse.Namespace) -> dict:
    import torch

    from blsp.models.configuration_blsp import BlspConfig
    from blsp.models.modeling_blsp import BlspModel
    from blsp.training.config import config_from_dict
    from blsp.training.trainer import train

    torch.manual_seed(0)
    model = BlspModel.from_config(BlspConfig(encoder=args.encoder, llm=args.llm), device="cpu")
    base_rss = _current_rss_mb()
    with open(args.data) as f:
        n = sum(1 for _ in f)
    steps_per_epoch = n // args.micro_batch
    results = []
    cache = Path(args.work) / f"encoder_cache-{args.worker}"
    for epoch in range(args.epochs):
        # one run per epoch so each epoch's rate is measured on its own; the cache carries over
        cfg = config_from_dict(
            {
                "name": f"{args.worker}{epoch}",
                "data": {
                    "train": [{"path": args.data}],
                    "encoder_cache": str(cache),
                    "group_by_length": True,
                },
                "train": {
                    "lr": 1e-4,
                    "warmup_steps": 0,
                    "global_batch_size": args.micro_batch,
                    "micro_batch_size": args.micro_batch,
                    "max_steps": steps_per_epoch,
                    "seed": epoch,
                    **VARIANTS[args.worker],
                },
                "run": {
                    "output_dir": str(Path(args.work) / f"{args.worker}{epoch}"),
                    "save_every": 10**6,
                    "progress": False,
                    "tensorboard": False,
                    "log_every": 10**6,
                },
            }
        )
        s = train(cfg, model=model)
        results.append(
            {
                "samples": s["samples"],
                "seconds": s["train_time_s"],
                "cache": s["encoder_cache"],
                "first_loss": s["first_loss"],
            }
        )
    return {"epochs": results, "peak_rss_mb": _rss_mb(), "base_rss_mb": base_rss}


def run_original(args: argparse.Namespace) -> dict:
    """The original's stage-2 step: 30 s padding, full encoder, separately padded prompt parts."""
    import random

    import numpy as np
    import torch

    from blsp.data.audio import load_audio
    from blsp.models.configuration_blsp import BlspConfig
    from blsp.models.modeling_blsp import BlspModel
    from blsp.models.prompt import AudioSpan, make_conversation

    torch.manual_seed(0)
    model = BlspModel.from_config(BlspConfig(encoder=args.encoder, llm=args.llm), device="cpu")
    base_rss = _current_rss_mb()
    with open(args.data) as f:
        rows = [json.loads(x) for x in f]
    opt = torch.optim.AdamW(model.adapter.parameters(), lr=1e-4, weight_decay=0.05)
    fe = model.encoder.feature_extractor
    emb = model.llm.get_input_embeddings()
    pad = model.tokenizer.pad_token_id

    def pad_ids(seqs: list[list[int]], fill: int) -> torch.Tensor:
        t = torch.full((len(seqs), max(len(s) for s in seqs)), fill, dtype=torch.long)
        for i, s in enumerate(seqs):
            t[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return t

    results = []
    for epoch in range(args.epochs):
        order = list(range(len(rows)))
        random.Random(epoch).shuffle(order)  # no length grouping
        t0, done = time.perf_counter(), 0
        for b in range(len(rows) // args.micro_batch):
            batch = [rows[i] for i in order[b * args.micro_batch : (b + 1) * args.micro_batch]]
            audios = [load_audio(r["audio"]) for r in batch]  # read again on every step (no cache)
            feats = fe(audios, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)  # 30 s
            frames = feats.attention_mask.sum(-1)
            prefix, suffix, labels = [], [], []
            for r in batch:
                segs = model.prompt.build(make_conversation(r["instruction"], audio=np.zeros(1))).segments
                k = next(i for i, s in enumerate(segs) if isinstance(s, AudioSpan))
                prefix.append([t for s in segs[:k] for t in s])
                target = model.prompt.response_ids(r["response"])
                after = [t for s in segs[k + 1 :] for t in s]
                suffix.append(after + target)
                labels.append([-100] * len(after) + target)
            model.train(True)
            x = feats.input_features
            with torch.no_grad():  # the frozen encoder over all 3000 frames, padding included
                hidden, _ = model.encoder(x, torch.full((len(batch),), x.shape[-1]))
            speech, _ = model.adapter(hidden.float(), torch.full((len(batch),), hidden.shape[1]))
            real = model.adapter.output_lengths(
                torch.tensor([model.encoder.output_length(int(f)) for f in frames])
            )
            speech_mask = torch.arange(speech.shape[1])[None] < real[:, None]
            p_ids, s_ids = pad_ids(prefix, pad), pad_ids(suffix, pad)
            p_mask = pad_ids([[1] * len(p) for p in prefix], 0)
            s_mask = pad_ids([[1] * len(s) for s in suffix], 0)
            lab = pad_ids(labels, -100)
            inputs = torch.cat([emb(p_ids), speech.to(emb.weight.dtype), emb(s_ids)], 1)
            mask = torch.cat([p_mask, speech_mask.long(), s_mask], 1)
            full_labels = torch.cat(
                [torch.full_like(p_ids, -100), torch.full(speech_mask.shape, -100), lab], 1
            )
            out = model.llm(inputs_embeds=inputs, attention_mask=mask, labels=full_labels, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.adapter.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += len(batch)
        results.append({"samples": done, "seconds": time.perf_counter() - t0, "cache": None})
    return {"epochs": results, "peak_rss_mb": _rss_mb(), "base_rss_mb": base_rss}


# --------------------------------------------------------------------------- main
def main() -> None:
    from blsp.models.hub import DEFAULT_LLM, DEFAULT_WHISPER

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=DEFAULT_WHISPER)
    ap.add_argument("--llm", default=DEFAULT_LLM)
    ap.add_argument("--tiny", action="store_true", help="tiny random models instead of the real ones")
    ap.add_argument(
        "--manifest", help="speech manifest with text (default: shared speechocean762, else espeak)"
    )
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch default)")
    ap.add_argument("--worker", choices=("original", *VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        import logging

        import torch

        logging.basicConfig(level=logging.WARNING)
        if args.threads:
            torch.set_num_threads(args.threads)
        res = (run_original if args.worker == "original" else run_ours)(args)
        Path(args.out).write_text(json.dumps(res))
        return

    if not args.manifest and (SHARED / "speech" / "speechocean762" / "train.jsonl").is_file():
        args.manifest = str(SHARED / "speech" / "speechocean762" / "train.jsonl")
    with tempfile.TemporaryDirectory(prefix="blsp-bench-") as tmp:
        work = Path(tmp)
        if args.tiny:
            args.encoder, args.llm = tiny_models(work)
        data = make_manifest(args, work)
        with open(data) as f:
            durs = [json.loads(x)["duration"] for x in f]
        print(
            f"data: {len(durs)} clips, {min(durs):.1f}-{max(durs):.1f} s (mean {sum(durs) / len(durs):.1f} s) "
            f"from {args.manifest or 'espeak-ng'}; models: {args.encoder} + {args.llm}; "
            f"micro batch {args.micro_batch}; {args.epochs} epochs"
        )
        res = {}
        for name in ("original", *VARIANTS):
            out = work / f"{name}.json"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--data",
                str(data),
                "--work",
                str(work),
                "--out",
                str(out),
                "--encoder",
                args.encoder,
                "--llm",
                args.llm,
                "--micro-batch",
                str(args.micro_batch),
                "--epochs",
                str(args.epochs),
                "--threads",
                str(args.threads),
            ]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            res[name] = json.loads(out.read_text())
            print(f"  {name}: done in {time.perf_counter() - t0:.0f} s")

    print()
    names = ("original", *VARIANTS)
    header = f"{'':<10}" + "".join(f"{'epoch ' + str(e + 1) + ' samples/s':>20}" for e in range(args.epochs))
    print(header + f"{'peak RSS MB':>14}{'+RSS MB':>10}{'first loss':>12}")
    for name in names:
        r = res[name]
        rates = [e["samples"] / e["seconds"] for e in r["epochs"]]
        first = r["epochs"][0].get("first_loss")
        print(
            f"{name:<10}"
            + "".join(f"{x:>20.2f}" for x in rates)
            + f"{r['peak_rss_mb']:>14.0f}{r['peak_rss_mb'] - r['base_rss_mb']:>10.0f}"
            + (f"{first:>12.4f}" if first is not None else f"{'':>12}")
        )

    def rate(name: str, e: int) -> float:
        ep = res[name]["epochs"][e]
        return ep["samples"] / ep["seconds"]

    for a, b in (("new", "old"), ("new", "original"), ("old", "original")):
        print(
            f"{a + '/' + b:<14}" + "".join(f"{rate(a, e) / rate(b, e):>15.2f}x" for e in range(args.epochs))
        )
    for name in VARIANTS:
        caches = [e["cache"] for e in res[name]["epochs"]]
        print(
            f"{name}, encoder cache per epoch (clips encoded / served from disk): "
            + ", ".join(f"{c['encoded']}/{c['served']}" for c in caches)
        )


if __name__ == "__main__":
    main()
