"""What one sign step of every neuron leaves of the clean accuracy, per eps (no trigger; fastpurify.anp_eps
reads its bound from this curve): python eps_curve.py SUBJECTS EPSES (environment as common.py; writes
OUT/eps-curve.json: per subject, per eps, [clean ACC, ACC under the step, top class of the errors, its share]
on the defender's images)."""
import os, sys, json, torch
from common import subject
from fastpurify.selection import PruningProbe
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
out = {}
for name in sys.argv[1].split(","):
    model, attack, clean, test = subject(name)
    masks = {n: torch.ones(m.num_features) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    row = {}
    for eps in map(float, sys.argv[2].split(",")):
        p = PruningProbe(model, masks, *clean, probe="neurons", eps=eps, steps=1, batch_size=250).point()
        row[f"1/{eps}"] = (round(p.acc, 3), round(1 - p.adv_error, 3), p.top_class, round(p.concentration, 3))
        print(name, eps, row[f"1/{eps}"], flush=True)
    out[name] = row
json.dump(out, open(os.environ.get("OUT", ".") + "/eps-curve.json", "w"), indent=1)
