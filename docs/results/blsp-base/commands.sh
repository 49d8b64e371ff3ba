#!/usr/bin/env bash
# How the shipped adapter (src/blsp/resources/pretrained/blsp-base) was made, on the 2-core CPU box.
# W is a scratch folder; ../shared/data is the team's real speech (speechocean762).
set -euo pipefail
W=${W:-/tmp/work}
S=${SHARED:-../shared/data}

# 1. Data: real non-native English (speechocean762 train, 2,500 clips) and synthetic speech of the
#    package's 2,511 training sentences, 2 voices each out of 8 (the evaluation voices flite:slt and
#    espeak:en+f3 are left out). Held-out set for the training-time check: 48 speechocean762 *test*
#    clips (other speakers) + 48 held-out sentences in the held-out voices.
blsp data import manifest $S/speech/speechocean762/train.jsonl $W/so_train.jsonl --normalize lower
blsp data import manifest $S/speech/speechocean762/test.jsonl $W/so_test.jsonl --normalize lower
blsp data synth src/blsp/resources/sentences/train.txt $W/synth --voices flite:kal flite:awb flite:rms \
  espeak:en-us espeak:en espeak:en+m3 espeak:en-us+f2 espeak:en-gb --voices-per-text 2 --workers 2
blsp data synth src/blsp/resources/sentences/heldout.txt $W/synth_heldout --voices flite:slt espeak:en+f3 \
  --voices-per-text 2 --workers 2 --manifest-name heldout.jsonl
python - <<PY   # train.jsonl = both training sets; eval.jsonl = 48 + 48 held-out clips (absolute paths)
import json, random
w = "$W"
with open(f"{w}/train.jsonl", "w") as out:
    out.writelines(open(f"{w}/so_train.jsonl"))
    for line in open(f"{w}/synth/train.jsonl"):
        r = json.loads(line); r["audio"] = f"{w}/synth/" + r["audio"]; out.write(json.dumps(r) + "\n")
so = [json.loads(x) for x in open(f"{w}/so_test.jsonl")]; random.Random(0).shuffle(so)
sy = [json.loads(x) for x in open(f"{w}/synth_heldout/heldout.jsonl")]; random.Random(0).shuffle(sy)
with open(f"{w}/eval.jsonl", "w") as out:
    for r in so[:48]: out.write(json.dumps(r) + "\n")
    for r in sy[:48]: r["audio"] = f"{w}/synth_heldout/" + r["audio"]; out.write(json.dumps(r) + "\n")
PY

# 2. Alignment warm start: CTC against the LLM's own token embeddings (no LLM forward). Stopped at
#    step 1,400 of 2,000 (44,800 samples, 0.36 h): its held-out CTC loss had flattened (2.67, 2.57,
#    2.51 at steps 750/1000/1250) while the training loss kept falling.
blsp train configs/align_ctc.yaml --set data.train.0.path=$W/train.jsonl \
  --set "data.eval=[{path: $W/eval.jsonl, task: repetition}]" \
  --set run.output_dir=$W/runs/align_ctc --set data.encoder_cache=$W/encoder_cache

# 3. Behavior alignment (repetition) from the warm start; checkpoints every 500 steps, resumable.
blsp train configs/blsp_default.yaml --set data.train.0.path=$W/train.jsonl \
  --set data.eval.0.path=$W/eval.jsonl \
  --set model.init_from=$W/runs/align_ctc/checkpoints/step-00001400/weights \
  --set run.output_dir=$W/runs/blsp_default --set data.encoder_cache=$W/encoder_cache
#    ... continue it later (same --set flags) with:  --resume
#    or, when runs/ is gone, from the shipped weights:  --set model.init_from=src/blsp/resources/pretrained/blsp-base

# 4. Curve, export, measurement.
blsp eval curve $W/runs/align_ctc $W/runs/blsp_default -o docs/results/blsp-base
blsp export $W/runs/blsp_default src/blsp/resources/pretrained/blsp-base --results $W/card_results.json \
  --command "see docs/results/blsp-base/commands.sh (step 3, with --resume)"
