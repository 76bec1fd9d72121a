"""Seventh round: how near-bar readings move with the patch reconstruction's seed. For each SUBJECT:CLASS pair,
the share of the other images a 2 % patch toward CLASS sends there on the unpruned model, for each seed; with
CLASS "all", the whole reading (selection.read_patch_area) toward the target of RULES_JSON.
python area_seeds.py SUBJECT:CLASS,... SEEDS RULES_JSON [AREA]; writes OUT/area-seeds-<pairs>.json."""
import json, os, sys
import torch
from common import evaluation_subject, mask_sets
from fastpurify.selection import PruningProbe, read_patch_area

torch.set_num_threads(1)
pairs, seeds = [p.split(":") for p in sys.argv[1].split(",")], [int(s) for s in sys.argv[2].split(",")]
rules = {}
for path in sys.argv[3].split(","):
    rules.update(json.load(open(path)))
area = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
out = {}
for name, cls in pairs:
    model, attack, clean, test, before = evaluation_subject(name)
    target = rules[f"{name}/mean"]["auto"][4][0][3]
    masks = mask_sets(name)["mean"]
    for seed in seeds:
        probe = PruningProbe(model, masks, *clean, probe="patch", eps=0.01, steps=100, batch_size=512, seed=seed,
                             target=target)
        if cls == "all":
            value = read_patch_area(probe, target, eps=0.01, steps=100, bar=0.4)
        else:
            value = probe.under("patch", eps=area, steps=100, target=int(cls)).point().target_share
        out[f"{name}:{cls}:seed{seed}"] = value
        print(name, cls, seed, json.dumps(value), flush=True)
tag = "_".join(f"{n}-{c}" for n, c in pairs)[:60]
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"area-seeds-{tag}.json"), "w"), indent=1)
