"""Load test of `blsp serve` on loopback: N concurrent clients, continuous vs static batching, in one run.

Starts the server once per mode (``--modes``, default ``continuous,static``: ``--batching
continuous`` and ``--batching static`` with ``--max-batch-size B``; ``off`` is static with
``--max-batch-size 1``), sends the same bounded set of streamed chat-completion requests with an
audio part from ``--clients`` concurrent clients, and prints throughput, p50/p95 latency and
time to first token side by side (with the ratio of the first two modes).

``--mixed`` instead starts one batching server and runs the same normal load twice: alone, then
with ``--hostile-clients`` threads sending hostile requests back to back (a FLAC decompression
bomb, hours of silence, too many clips, deeply nested and non-finite JSON, bad base64, an
oversized body, unsupported parameters). It reports the normal requests' p50/p95 latency with
and without the hostile traffic, and how the hostile ones were answered (status codes, time).

    .venv/bin/python bench/serve_load.py                       # untrained whisper-base + smollm2 adapter
    .venv/bin/python bench/serve_load.py --adapter blsp-base   # the shipped adapter
    .venv/bin/python bench/serve_load.py --adapter runs/blsp/final --clients 8 --requests 64 --modes continuous,off
    .venv/bin/python bench/serve_load.py --mixed --requests 8  # normal latency under hostile traffic
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

INSTRUCTIONS = [
    "Please repeat the following words.",
    "Continue the following text in a coherent and engaging style with less than 40 words.",
    "Please translate the following English text into German text.",
    "Please classify the emotional tone of the text as either positive, negative, or neutral.",
]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "It is a beautiful sunny morning and I would like to go for a walk.",
    "Please remind me to buy milk and bread on the way home.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_clips(folder: Path) -> list[Path]:
    clips = []
    for k, text in enumerate(SENTENCES):
        path = folder / f"clip{k}.wav"
        if shutil.which("espeak-ng"):
            subprocess.run(
                ["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True
            )
        else:  # no TTS: a tone of about the same length
            import numpy as np
            import soundfile as sf

            t = np.arange(48000) / 16000
            sf.write(path, (0.2 * np.sin(2 * np.pi * (200 + 50 * k) * t)).astype("float32"), 16000)
        clips.append(path)
    return clips


def untrained_adapter(folder: Path) -> Path:
    import torch

    from blsp.models.configuration_blsp import BlspConfig
    from blsp.models.modeling_blsp import BlspModel

    torch.manual_seed(0)
    path = folder / "blsp-untrained"
    BlspModel.from_config(BlspConfig(), device="cpu").save_pretrained(path)
    return path


def start_server(
    adapter: Path, batch: int, wait_ms: float, max_tokens: int, log: Path, batching: str = "continuous"
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("blsp")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "blsp.cli"]
    cmd += [
        "serve",
        str(adapter),
        "--port",
        str(port),
        "--max-batch-size",
        str(batch),
        "--batch-wait-ms",
        str(wait_ms),
        "--batching",
        batching,
        "--max-tokens-limit",
        str(max_tokens),
        "--log-level",
        "warning",
        "--device",
        "cpu",
    ]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 600 s")


def one_request(
    http: httpx.Client, url: str, model: str, clip_b64: str, instruction: str, max_tokens: int
) -> dict:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": instruction},
                    {"type": "input_audio", "input_audio": {"data": clip_b64, "format": "wav"}},
                ],
            }
        ],
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if obj.get("choices") and obj["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return {"latency": total, "ttft": first if first is not None else total, "tokens": tokens}


def run_load(url: str, model: str, clips: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    counter = iter(range(requests))
    lock = threading.Lock()
    results: list[dict] = []
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                try:
                    res = one_request(
                        http,
                        url,
                        model,
                        clips[k % len(clips)],
                        INSTRUCTIONS[k % len(INSTRUCTIONS)],
                        max_tokens,
                    )
                except Exception as e:  # counted, reported
                    errors.append(str(e))
                    continue
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    engine = httpx.get(url + "/health", timeout=10).json()["engine"]
    return {"wall": wall, "results": results, "errors": errors, "engine": engine}


def silent_flac(seconds: float, sr: int, channels: int) -> bytes:
    """Silence as FLAC: a few hundred KB that decode to gigabytes."""
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    block = np.zeros((sr, channels), dtype=np.int16)
    with sf.SoundFile(buf, "w", samplerate=sr, channels=channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds)):
            f.write(block)
    return buf.getvalue()


def hostile_requests(model: str, clip_b64: str) -> list[tuple[str, bytes]]:
    """(name, raw JSON body) of requests the server must refuse quickly with a 4xx."""

    def body(parts: list[dict] | None = None, **extra) -> bytes:
        content = [{"type": "text", "text": "Repeat."}, *(parts or [])]
        msg = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra}
        return json.dumps(msg).encode()

    def audio(data: bytes, fmt: str) -> dict:
        return {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt},
        }

    bomb = silent_flac(119, 384_000, 8)
    hours = silent_flac(2 * 3600, 16000, 1)
    return [
        ("flac bomb", body([audio(bomb, "flac")])),
        ("hours of silence", body([audio(hours, "flac")])),
        (
            "too many clips",
            body([{"type": "input_audio", "input_audio": {"data": clip_b64, "format": "wav"}}] * 16),
        ),
        ("deep json", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("nan", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
        (
            "bad base64",
            body([{"type": "input_audio", "input_audio": {"data": "@@@" * 1000, "format": "wav"}}]),
        ),
        ("tools", body([], tools=[{"type": "function", "function": {"name": "f"}}])),
        ("oversized body", b'{"messages": "' + b"x" * (30 << 20) + b'"}'),
        ("role list", json.dumps({"messages": [{"role": ["user"], "content": "x"}]}).encode()),
    ]


def run_hostile(url: str, requests: list[tuple[str, bytes]], stop: threading.Event, out: list[dict]) -> None:
    with httpx.Client(timeout=120) as http:
        k = 0
        while not stop.is_set():
            name, raw = requests[k % len(requests)]
            k += 1
            t0 = time.perf_counter()
            try:
                r = http.post(
                    url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
                )
                status = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            out.append({"name": name, "status": status, "latency": time.perf_counter() - t0})


def mixed(args: argparse.Namespace, adapter: Path, clips: list[str], work: Path) -> None:
    """Normal load alone, then with hostile clients; prints the normal requests' latency both ways."""
    proc, url = start_server(
        adapter, args.batch_size, args.wait_ms, args.max_tokens, work / "serve-mixed.log"
    )
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        one_request(httpx.Client(timeout=600), url, model, clips[0], INSTRUCTIONS[0], 4)  # warm up
        hostile = hostile_requests(model, clips[0])
        alone = run_load(url, model, clips, args.clients, args.requests, args.max_tokens)
        stop, answers = threading.Event(), []
        threads = [
            threading.Thread(target=run_hostile, args=(url, hostile, stop, answers))
            for _ in range(args.hostile_clients)
        ]
        for t in threads:
            t.start()
        try:
            loaded = run_load(url, model, clips, args.clients, args.requests, args.max_tokens)
        finally:
            stop.set()
            for t in threads:
                t.join()
        health = httpx.get(url + "/health", timeout=10).json()["status"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(
        f"\nblsp serve under hostile traffic: {args.clients} normal clients x {args.requests} streamed "
        f"requests, {args.hostile_clients} hostile clients, CPU threads {os.cpu_count()}"
    )
    print(f"{'normal requests':<16}{'alone':>12}{'+ hostile':>12}")
    for key, values in [
        ("ok", (len(alone["results"]), len(loaded["results"]))),
        ("errors", (len(alone["errors"]), len(loaded["errors"]))),
        ("lat_p50", tuple(pct([r["latency"] for r in run["results"]], 50) for run in (alone, loaded))),
        ("lat_p95", tuple(pct([r["latency"] for r in run["results"]], 95) for run in (alone, loaded))),
        ("ttft_p50", tuple(pct([r["ttft"] for r in run["results"]], 50) for run in (alone, loaded))),
    ]:
        print(f"{key:<16}" + "".join(f"{v:>12.2f}" if isinstance(v, float) else f"{v:>12}" for v in values))
    print(f"hostile requests answered: {len(answers)}; server health after: {health}")
    by_name: dict[str, Counter] = {}
    for a in answers:
        by_name.setdefault(a["name"], Counter())[a["status"]] += 1
    for name, counts in by_name.items():
        lat = [a["latency"] for a in answers if a["name"] == name]
        print(f"  {name:<18} {dict(counts)}  p50 {pct(lat, 50):.3f} s  max {max(lat):.3f} s")
    if loaded["errors"]:
        print(f"first normal error under hostile traffic: {loaded['errors'][0]}", file=sys.stderr)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--adapter", type=Path, help="adapter folder (default: an untrained whisper-base + smollm2 one)"
    )
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16, help="requests per mode")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="--max-batch-size of the batching runs")
    ap.add_argument("--wait-ms", type=float, default=10.0, help="--batch-wait-ms of the batching runs")
    ap.add_argument(
        "--modes",
        default="continuous,static",
        help="comma-separated: continuous, static (both with --batch-size), off (static, batch 1)",
    )
    ap.add_argument("--mixed", action="store_true", help="normal load with and without hostile requests")
    ap.add_argument("--hostile-clients", type=int, default=2, help="with --mixed: hostile sender threads")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    work = Path(tempfile.mkdtemp(prefix="blsp-bench-"))
    try:
        adapter = args.adapter or untrained_adapter(work)
        clips = [base64.b64encode(p.read_bytes()).decode() for p in make_clips(work)]
        if args.mixed:
            mixed(args, adapter, clips, work)
            return 0
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        labels = {
            "continuous": f"continuous (B={args.batch_size})",
            "static": f"static (B={args.batch_size}, {args.wait_ms:g} ms)",
            "off": "batching off (B=1)",
        }
        if unknown := [m for m in modes if m not in labels]:
            raise SystemExit(f"unknown --modes {unknown}: use continuous, static, off")
        rows = {}
        for mode in modes:
            batch, wait = (args.batch_size, args.wait_ms) if mode != "off" else (1, 0.0)
            batching = "continuous" if mode == "continuous" else "static"
            proc, url = start_server(
                adapter, batch, wait, args.max_tokens, work / f"serve-{mode}.log", batching
            )
            try:
                model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                one_request(httpx.Client(timeout=600), url, model, clips[0], INSTRUCTIONS[0], 4)  # warm up
                before = httpx.get(url + "/health").json()["engine"]
                run = run_load(url, model, clips, args.clients, args.requests, args.max_tokens)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            res = run["results"]
            e = run["engine"]
            batches = e["batches"] - before["batches"]
            steps = e.get("decode_steps", 0) - before.get("decode_steps", 0)
            step_rows = e.get("step_rows", 0) - before.get("step_rows", 0)
            rows[mode] = {
                "ok": len(res),
                "errors": len(run["errors"]),
                "wall_s": run["wall"],
                "req_per_s": len(res) / run["wall"],
                "tok_per_s": sum(r["tokens"] for r in res) / run["wall"],
                "lat_p50": pct([r["latency"] for r in res], 50),
                "lat_p95": pct([r["latency"] for r in res], 95),
                "ttft_p50": pct([r["ttft"] for r in res], 50),
                "ttft_p95": pct([r["ttft"] for r in res], 95),
                "mean_batch": (e["jobs_done"] - before["jobs_done"]) / batches if batches else 0.0,
                "rows_per_step": step_rows / steps if steps else float("nan"),
            }
            if run["errors"]:
                print(f"[{mode}] first error: {run['errors'][0]}", file=sys.stderr)

        print(
            f"\nblsp serve load: {args.clients} clients, {args.requests} streamed requests per mode, "
            f"max_tokens {args.max_tokens}, audio ~3 s, adapter {args.adapter or 'untrained'}, "
            f"CPU threads {os.cpu_count()}"
        )
        a, b = (modes + [None])[:2]
        header = f"{'metric':<14}" + "".join(f"{labels[m]:>30}" for m in rows)
        if b is not None:
            header += f"{a[:4] + '/' + b[:4]:>11}"
        print(header)
        for key, fmt in [
            ("ok", "{:.0f}"),
            ("errors", "{:.0f}"),
            ("wall_s", "{:.2f}"),
            ("req_per_s", "{:.3f}"),
            ("tok_per_s", "{:.2f}"),
            ("lat_p50", "{:.2f}"),
            ("lat_p95", "{:.2f}"),
            ("ttft_p50", "{:.2f}"),
            ("ttft_p95", "{:.2f}"),
            ("mean_batch", "{:.2f}"),
            ("rows_per_step", "{:.2f}"),
        ]:
            line = f"{key:<14}" + "".join(f"{fmt.format(rows[m][key]):>30}" for m in rows)
            if b is not None and rows[b][key] and math.isfinite(rows[a][key] / rows[b][key]):
                line += f"{rows[a][key] / rows[b][key]:>11.2f}"
            print(line)
        print(
            "(mean_batch: requests per batch, continuous: per admission wave; rows_per_step: continuous only)"
        )
        print("(latency and TTFT in seconds; ratios > 1 are better for req/s and tok/s, worse for times)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
