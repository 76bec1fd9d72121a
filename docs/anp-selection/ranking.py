"""Ranking quality (uses the trigger; evaluation only): the fewest neurons that bring ASR <= 10 % and <= 5 %,
and the test ACC there, for each mask set; plus threshold-0.2 counts."""
import os, sys, json, torch
from common import mask_sets, subject
from fastpurify.backdoor import evaluate
from fastpurify.pruning import prune, count_pruned
torch.set_num_threads(1)
out = {}
names = sys.argv[1].split(",")
for name in names:
    model, attack, _, test = subject(name)
    if name.startswith("digits"):
        ks = range(0, 80, 1)
    else:  # a fixed random 2,000 of the test images; k = 0..30 (0..40 for badnets-s0 in ranking-badnets-s0.json)
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(test[1].numel(), generator=g)[:2000]
        test, ks = (test[0][idx], test[1][idx]), range(0, int(os.environ.get("MAX_K", "30")) + 1)
    sets = mask_sets(name)
    base = evaluate(model, *test, attack)
    for label, masks in [(l, sets[l]) for l in (sys.argv[2].split(",") if len(sys.argv) > 2 else sets)]:
        curve = []
        for k in ks:
            m = evaluate(prune(model, masks, number=k) if k else model, *test, attack)
            curve.append((k, m["acc"], m["asr"]))
        def first(limit):
            for k, acc, asr in curve:
                if asr <= limit:
                    return k, round(100 * (base["acc"] - acc), 1)
            return None, None
        row = dict(thr=count_pruned(masks, threshold=0.2), asr10=first(0.10), asr5=first(0.05), curve=curve)
        out[f"{name}/{label}"] = row
        print(f"{name:12s} {label:5s} base ACC {100*base['acc']:.1f} | thr0.2 k={row['thr']} | ASR<=10: k={row['asr10'][0]} drop {row['asr10'][1]} | ASR<=5: k={row['asr5'][0]} drop {row['asr5'][1]}", flush=True)
    json.dump(out, open(os.environ.get("OUT", ".") + f"/ranking-{'_'.join(names)}.json", "w"))
