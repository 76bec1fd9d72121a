"""Seventh round: the patch size the auto rule reads from each model (order_area="auto", selection.read_patch_area),
on the unpruned model, toward the target the auto rule names (the target field of a rules.py output).
python area_reading.py SUBJECTS RULES_JSON [THREADS]; prints and writes OUT/area-reading-<subjects>.json."""
import json, os, sys, time
import torch
from common import evaluation_subject, mask_sets
from fastpurify.selection import DEFAULT_EPS, DEFAULT_STEPS, PruningProbe, read_patch_area

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
names = sys.argv[1].split(",")
rules = {}
for path in sys.argv[2].split(","):
    rules.update(json.load(open(path)))
out = {}
for name in names:
    t0 = time.time()
    model, attack, clean, test, before = evaluation_subject(name)
    row = rules[f"{name}/mean"]
    target = row["auto"][4][0][3]
    probe = PruningProbe(model, mask_sets(name)["mean"], *clean, probe="patch", eps=DEFAULT_EPS["patch"],
                         steps=DEFAULT_STEPS["patch"], batch_size=512, target=target)
    area, reading = read_patch_area(probe, target, eps=DEFAULT_EPS["patch"], steps=DEFAULT_STEPS["patch"], bar=0.4,
                                    known=row.get("class_shares"))
    out[name] = dict(target=target, area=area, reading=reading, seconds=round(time.time() - t0, 1))
    print(name, json.dumps(out[name]), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"area-reading-{'_'.join(names)[:60]}.json"), "w"), indent=1)
