"""ACC / ASR on the test split and the defender's clean accuracy after pruning k = 0..KMAX neurons along the order a
rules.py run built (then ANP's ranking of the mean mask), for each subject of its JSON (eleventh round).
python order_curve.py RULES_JSON KMAX  (common.py's environment: DIGITS, MASKS or CIFAR, SUBJECTS, MASKS)"""
import json
import sys

import torch

from common import mask_sets, subject
from fastpurify.backdoor import evaluate
from fastpurify.patch_order import PatchOrder
from fastpurify.pruning import prune

torch.set_num_threads(1)
pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
for key, row in json.load(open(sys.argv[1])).items():
    name, label = key.split("/")
    model, attack, clean, test = subject(name)
    neurons = [tuple(n) for n in row["order"]["neurons"]]
    ranking = PatchOrder(neurons, [], [], 0.0, "").ranking(mask_sets(name)[label])
    print(f"{name}: {len(neurons)} ordered, the auto rule chose {row['auto'][0]}")
    for k in range(int(sys.argv[2]) + 1):
        pruned = prune(model, ranking, number=k).eval()
        m, d = evaluate(pruned, *test, attack), evaluate(pruned, *clean, None)
        print(f"  k {k:2d}: ACC {pct(m['acc'])} ASR {pct(m['asr'])} | the defender's images {pct(d['acc'])}", flush=True)
