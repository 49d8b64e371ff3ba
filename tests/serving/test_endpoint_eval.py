"""`blsp eval -s NAME=endpoint:URL`: a running `blsp serve` measured like a local adapter.

The shipped adapter is served on loopback and evaluated through its OpenAI-compatible API, and
evaluated directly; the answers, and so the numbers, must be the same.
"""

from __future__ import annotations

import json

import pytest

from blsp.evaluation.api import evaluate
from blsp.models.hub import resolve_adapter

pytestmark = pytest.mark.slow

SENTENCES = [
    "the weather is nice today",
    "please open the window",
    "turn the kitchen lights off",
    "i loved the concert last night",
]


def test_a_served_adapter_gives_the_numbers_of_the_adapter_itself(launch, speech_wav, tmp_path):
    pytest.importorskip("openai")
    shipped_server = launch(
        ["serve", "--device", "cpu", "--batch-wait-ms", "0"], "/health", tmp_path / "serve.log"
    )
    rows = [
        {"id": f"e{i}", "audio": str(speech_wav(s)), "text": s, "label": "positive"}
        for i, s in enumerate(SENTENCES)
    ]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    systems = [f"served=endpoint:{shipped_server.url}/v1", f"direct=blsp:{resolve_adapter('blsp-base')}"]
    tasks = [f"asr@{manifest}", f"align@{manifest}", f"content@{manifest}"]
    res = evaluate(systems, tasks, tmp_path / "eval", max_new_tokens=24, batch_size=1, device="cpu")
    r = res["results"]
    keys = {t["name"]: t["key"] for t in res["tasks"]}
    key = keys["asr"]
    assert r["served"][key]["failed"] == 0 and r["served"][key]["n"] == len(SENTENCES)
    assert r["served"][key]["wer"] == pytest.approx(r["direct"][key]["wer"])
    assert r["served"][key]["distinct_answers"] == r["direct"][key]["distinct_answers"] >= 3

    def answers(system: str, task: str) -> dict[str, str]:
        path = tmp_path / "eval" / r[system][task]["outputs"]
        return {j["id"]: j["response"] for j in map(json.loads, path.read_text().splitlines())}

    assert answers("served", key) == answers("direct", key)
    align = keys["align"]
    assert answers("served", align) == answers("direct", align)  # the speech path of behavior alignment
    assert r["served"][align]["kl"] is None and r["direct"][align]["kl"] is not None  # no logits over HTTP
    assert str(r["served"][keys["content"]]["status"]).startswith("n/a")


def test_an_endpoint_spec_needs_a_url():
    from blsp.errors import BlspError
    from blsp.evaluation.system_specs import parse_system_specs

    with pytest.raises(BlspError, match="endpoint needs a URL"):
        parse_system_specs(["endpoint:localhost"])
