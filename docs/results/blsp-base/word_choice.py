"""Step 1 under content-dependent label choices: "which of these words does the text contain?".

Each transcript gets its own list of four capitalised words, one from the transcript and three
from other transcripts, in a random order; the frozen LLM answers on the transcript (the text
path, greedy), and an answer is kept when it names exactly one listed word (the evaluation's
LabelMapper, no fuzzy match) in at most 8 words and that word is the transcript's, at most a
quarter of the kept answers at each list position (SmolLM2-135M favours the first). Unlike the
label-choice instructions, whose answers are mostly one label whatever the text, the answer here
depends on the words, so the speech path has to carry them to reproduce it.
Usage: W=/tmp/work python word_choice.py N [NAME]  -> $W/NAME (default word_clips.jsonl)
"""

import json, os, random, re, sys
from collections import Counter
from blsp.evaluation.labels import LabelMapper
from blsp.models.modeling_blsp import BlspModel

W = os.environ.get("W", "/tmp/work")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1200
OUT = sys.argv[2] if len(sys.argv) > 2 else "word_clips.jsonl"
TEMPLATES = [
    "Which of these words does the text contain? Choose from [{opts}].",
    "Please pick the word that appears in the text, choose from [{opts}].",
    "One of these words is in the following text. Answer with that word only, from [{opts}].",
]
STOP = set("that this with from have were they their there what when where which would could should about".split())
rows = [json.loads(x) for x in open(f"{W}/train.jsonl")]
texts = list(dict.fromkeys(r["text"] for r in rows))
rng = random.Random(5)
rng.shuffle(texts)
words = lambda t: [w for w in re.findall(r"[a-z]{4,}", t.lower()) if w not in STOP]
vocab = sorted({w for t in texts for w in words(t)})
items = []
for t in texts[:N]:
    ws = words(t)
    if not ws:
        continue
    gold = rng.choice(ws)
    opts = [gold] + rng.sample([v for v in vocab if v not in ws], 3)
    rng.shuffle(opts)
    opts = [o.capitalize() for o in opts]
    items.append((t, rng.choice(TEMPLATES).format(opts=", ".join(opts)), opts, gold.capitalize()))
m = BlspModel.from_pretrained("blsp-base")
m.eval()
convs = [{"conversation": [{"role": "user", "content": [{"type": "text", "text": ins}, {"type": "transcript", "text": t}]}]} for t, ins, _, _ in items]
outs = []
for k in range(0, len(convs), 32):
    outs += m.generate(convs[k : k + 32], max_new_tokens=12, loop_guard=False)
stats, per_pos, kept = Counter(), Counter(), {}
cap = len(items) // 8
for (t, ins, opts, gold), o in zip(items, outs):
    lab = LabelMapper(opts)(o)
    ok = lab.label == gold and lab.how != "fuzzy" and len(o.split()) <= 8
    stats["right" if lab.label == gold else "wrong" if lab.label else "off"] += 1
    if ok and per_pos[opts.index(gold)] < cap:
        per_pos[opts.index(gold)] += 1
        kept[t] = {"behavior": "wordchoice", "instruction": ins, "response": o}
n = 0
with open(f"{W}/{OUT}", "w") as f:
    for r in rows:
        c = kept.get(r["text"])
        if c:
            f.write(json.dumps({**r, **c}) + "\n")
            n += 1
print(dict(stats), "kept texts", len(kept), "by position", dict(per_pos), "clips", n)
