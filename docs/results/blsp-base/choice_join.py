"""Join step-1 answers to their clips: choice answers kept only when they name exactly one listed label (the
evaluation's own LabelMapper, no fuzzy match) in at most 8 words, at most 150 texts a label; free answers as written (echoes already dropped)."""

import glob, json, os
from collections import Counter
from blsp.evaluation.labels import LabelMapper
from blsp.instructions import choice_labels

W = os.environ.get("W", "/tmp/work")
choice, free, stats, per_label = {}, {}, Counter(), Counter()
CAP = 150
for p in sorted(glob.glob(f"{W}/beh_c[0-9][0-9].jsonl")):
    for x in open(p):
        r = json.loads(x)
        m = LabelMapper(choice_labels(r["instruction"]))(r["response"])
        ok = m.label is not None and m.how != "fuzzy" and len(r["response"].split()) <= 8
        ok = (
            ok and per_label[(r["instruction"], m.label)] < CAP
        )  # the LLM's answers are skewed ("People" 679 times)
        if ok:
            per_label[(r["instruction"], m.label)] += 1
        stats["choice_kept" if ok else "choice_dropped"] += 1
        if ok:
            choice[r["text"]] = r
for p in sorted(glob.glob(f"{W}/beh_[0-9][0-9].jsonl")):
    for x in open(p):
        r = json.loads(x)
        free[r["text"]] = r
        stats["free"] += 1
for name, beh in (("choice_clips", choice), ("free_clips", free)):
    n = 0
    with open(f"{W}/{name}.jsonl", "w") as f:
        for line in open(f"{W}/train.jsonl"):
            r = json.loads(line)
            c = beh.get(r["text"])
            if c:
                r.update(behavior=c["behavior"], instruction=c["instruction"], response=c["response"])
                f.write(json.dumps(r) + "\n")
                n += 1
    stats[name] = n
print(dict(stats))
