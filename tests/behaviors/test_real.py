"""Step 1 with the real SmolLM2-135M-Instruct: the CLI, the training prompt, HTTP parity, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blsp.behaviors.backends import behavior_params
from blsp.behaviors.inputs import sidecar
from blsp.behaviors.job import BehaveOptions, run_behave
from blsp.instructions import CONTINUATION, REPETITION
from blsp.models.prompt import prompt_fingerprint
from blsp.utils.io import iter_jsonl

REPO = Path(__file__).resolve().parents[2]
BLSP = Path(sys.executable).with_name("blsp")
SENTENCES = REPO / "src/blsp/resources/sentences/train.txt"

pytestmark = pytest.mark.slow


def sentences(n: int, start: int = 0) -> list[str]:
    lines = [s.strip() for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    return lines[start : start + n]


def rows_of(path: Path) -> list[dict]:
    rows = []
    for lineno, obj, raw in iter_jsonl(path):
        assert obj is not None, f"{path}:{lineno}: invalid JSON line {raw!r}"
        rows.append(obj)
    return rows


def blsp(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BLSP), *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture
def manifest(tmp_path) -> Path:
    """Five real sentences; the audio refs need not exist: step 1 reads text only and records them."""
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    rows = [
        {
            "id": f"s{i}",
            "audio": f"clips/s{i}.ogg",
            "text": t,
            "duration": 3.0,
            "speaker": "spk7",
            "lang": "en",
        }
        for i, t in enumerate(sentences(5, start=40))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_continuation_and_repetition_use_the_training_prompt(real_model, manifest, tmp_path):
    from blsp.models.prompt import make_conversation

    out = tmp_path / "out"
    cw = blsp("behave", str(manifest), str(out / "cw.jsonl"), "--max-new-tokens", "24", "--batch-size", "3")
    assert cw.returncode == 0, cw.stderr
    summary = json.loads(cw.stdout)
    run_behave(BehaveOptions(manifest=manifest, out=out / "rp.jsonl", behavior="repetition"))

    kept = rows_of(out / "cw.jsonl")
    rejected = (
        rows_of(sidecar(out / "cw.jsonl", "rejected.jsonl"))
        if sidecar(out / "cw.jsonl", "rejected.jsonl").exists()
        else []
    )
    assert summary["kept"] == len(kept) and sum(summary["rejected"].values()) == len(rejected)
    assert len(kept) + len(rejected) == 5 and {r["reason"] for r in rejected} <= {"echo", "refusal", "empty"}
    assert summary["echo_rate"] == pytest.approx((sum(r["reason"] == "echo" for r in rejected)) / 5, abs=1e-4)
    texts = {f"s{i}": t for i, t in enumerate(sentences(5, start=40))}
    for r in kept:
        assert set(r) >= {"id", "audio", "text", "instruction", "response", "behavior", "generation", "flags"}
        assert r["audio"] == f"../data/clips/{r['id']}.ogg" and (r["speaker"], r["lang"], r["duration"]) == (
            "spk7",
            "en",
            3.0,
        )
        assert (
            r["instruction"] == CONTINUATION
            and r["behavior"] == "continuation"
            and r["text"] == texts[r["id"]]
        )
        assert r["response"] and r["response_tokens"] <= 24
        assert r["generation"] == {
            "backend": "transformers",
            "batching": "shrink",
            "model": "smollm2-135m-instruct",
            "prompt_template": "auto",
            "chat_template": True,
            "instruction_separator": "\n",
            "system_prompt": None,
            "max_prompt_tokens": 192,
            "max_new_tokens": 24,
            "do_sample": False,
        }

    # The prompt of step 1 is the text path of the training example, token for token.
    for r in kept + rejected:
        ids = real_model.prompt.text_prompt(make_conversation(CONTINUATION, transcript=r["text"]))
        assert r["prompt_sha1"] == prompt_fingerprint(ids) and r["prompt_tokens"] == len(ids)
    # ... and its response is what the BLSP model itself generates on that text path (greedy).
    order = sorted(kept + rejected, key=lambda r: r["id"])
    expected = real_model.generate(
        [{"conversation": make_conversation(CONTINUATION, transcript=r["text"])} for r in order],
        max_new_tokens=24,
    )
    assert [r["response"] for r in order] == expected

    reps = rows_of(out / "rp.jsonl")
    assert len(reps) == 5
    for r in reps:
        assert r["response"] == r["text"] and r["instruction"] == REPETITION and r["behavior"] == "repetition"
        ids = real_model.prompt.text_prompt(make_conversation(REPETITION, transcript=r["text"]))
        assert r["prompt_sha1"] == prompt_fingerprint(ids)


def openai_completions_app(llm, tokenizer):
    """A minimal OpenAI-compatible ``/v1/completions`` over a transformers causal LM (one request at a time)."""
    import torch
    from fastapi import FastAPI, HTTPException

    app = FastAPI()
    lock = threading.Lock()
    eos = llm.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])

    @app.post("/v1/completions")
    def completions(body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise HTTPException(400, "prompt must be a string or a list of token ids")
        max_tokens = int(body.get("max_tokens", 16))
        temperature = float(body.get("temperature", 1.0))
        kwargs = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
        with lock, torch.inference_mode():
            out = llm.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                eos_token_id=sorted(stops),
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
        new = out[0, len(ids) :].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), None)
        text = tokenizer.decode(new[:cut], skip_special_tokens=True)
        return {
            "id": "cmpl-test",
            "object": "text_completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "text": text, "finish_reason": "length" if cut is None else "stop"}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new[:cut])},
        }

    return app


def test_http_backend_matches_transformers_backend_greedy(real_model, loopback, tmp_path):
    texts = sentences(6, start=100)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"h{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    common = dict(manifest=manifest, settings=behavior_params(max_new_tokens=24), echo="flag")
    local = run_behave(
        BehaveOptions(out=tmp_path / "tf.jsonl", **common), llm=(real_model.llm, real_model.tokenizer)
    )
    app = openai_completions_app(real_model.llm, real_model.tokenizer)
    with loopback(app) as url:
        remote = run_behave(
            BehaveOptions(
                out=tmp_path / "http.jsonl", backend="http", endpoint=url + "/v1", concurrency=3, **common
            )
        )
    assert local["kept"] == remote["kept"] == 6 and remote["failed"] == 0
    tf = {r["id"]: r for r in rows_of(tmp_path / "tf.jsonl")}
    http = {r["id"]: r for r in rows_of(tmp_path / "http.jsonl")}
    assert {k: r["response"] for k, r in http.items()} == {k: r["response"] for k, r in tf.items()}
    assert {k: r["flags"] for k, r in http.items()} == {k: r["flags"] for k, r in tf.items()}
    assert all(r["prompt_sha1"] == tf[k]["prompt_sha1"] for k, r in http.items())


def test_sigkill_mid_run_then_rerun_loses_nothing_and_duplicates_nothing(tiny_dirs, tmp_path):
    texts = sentences(40, start=200)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({"id": f"k{i:03d}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    out = tmp_path / "cw.jsonl"
    args = [str(BLSP), "behave", str(manifest), str(out), "--model", str(tiny_dirs["llm"]), "--batch-size", "2",
            "--max-new-tokens", "16", "--max-prompt-tokens", "1000"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, (
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept_before = {r["id"] for r in rows_of(out)}
    rejects = sidecar(out, "rejected.jsonl")
    done = kept_before | ({r["id"] for r in rows_of(rejects)} if rejects.exists() else set())
    assert 4 <= len(done) < 40
    with open(out, "ab") as f:  # what a write torn by the kill would leave behind
        f.write(b'{"id": "k059", "text": "half a li')

    summary = run_behave(  # the same job, resumed in this process
        BehaveOptions(
            manifest=manifest,
            out=out,
            model=str(tiny_dirs["llm"]),
            batch_size=2,
            settings=behavior_params(max_new_tokens=16),
            max_prompt_tokens=1000,
        )
    )
    assert summary["this_run"]["generated"] == 40 - len(done), "work done before the kill is not redone"
    kept = rows_of(out)
    rejected = rows_of(sidecar(out, "rejected.jsonl")) if sidecar(out, "rejected.jsonl").exists() else []
    ids = [r["id"] for r in kept] + [r["id"] for r in rejected]
    assert len(ids) == len(set(ids)), "no id twice"
    assert set(ids) == {f"k{i:03d}" for i in range(40)}, "no id missing"
    assert kept_before <= {r["id"] for r in kept}
