"""Seventh round: what a larger reconstructed patch says along the trigger-guided order (docs/anp-selection.md).
python ladder_study.py SUBJECTS AREAS KMAX ORDER_JSON [THREADS]
For each subject, the order the auto rule walked (ORDER_JSON: rules.py outputs, comma-separated, with "order", key "<subject>/mean")
is re-applied as a ranking; after each k = 0..KMAX pruned neurons: the ACC / ASR on the fixed 2,000 test images (the
trigger for evaluation only), the defender's clean accuracy, and for each area the share of the defender's other
images a patch reconstructed toward the suspected target (the auto rule's: row["auto"] curve's target) sends there.
SUBJECTS "scan:<subject>" instead: the unpruned model's patch shares toward every class at each area (the clean
controls). SEEDS (environment, default "0"): the patch reconstruction's seeds; a share of seed s > 0 is keyed
"<area>@s<s>" (ninth round: several seeds' patches at each k). Writes OUT/ladder-<subjects>.json."""
import json, os, sys, time
import torch
from common import evaluation_subject, mask_sets
from fastpurify.backdoor import evaluate
from fastpurify.patch_order import PatchOrder
from fastpurify.pruning import prune
from fastpurify.inference import predict
from fastpurify.patch_trigger import reconstruct_patch

torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
names, areas, kmax = sys.argv[1].split(","), [float(a) for a in sys.argv[2].split(",")], int(sys.argv[3])
source = {}
for path in sys.argv[4].split(",") if sys.argv[4] != "-" else []:
    source.update(json.load(open(path)))


seeds = [int(v) for v in os.environ.get("SEEDS", "0").split(",")]


def share(net, images, labels, target, area, seed=0):
    others = images[labels != target]
    mask, pattern = reconstruct_patch(net, others, target, area=area, steps=100, batch_size=512, seed=seed)
    return float((predict(net, (1 - mask) * others + mask * pattern, 512) == target).float().mean())


out = {}
for name in names:
    t0 = time.time()
    if name.startswith("scan:"):
        model, attack, clean, test, before = evaluation_subject(name[5:])
        classes = int(model(clean[0][:1]).shape[1])
        out[name] = {str(a): [round(share(model, *clean, c, a), 4) for c in range(classes)] for a in areas}
        print(name, json.dumps(out[name]), f"{time.time() - t0:.0f} s", flush=True)
        continue
    model, attack, clean, test, before = evaluation_subject(name)
    row = source[f"{name}/mean"]
    masks = mask_sets(name)["mean"]
    neurons = [tuple(n) for n in row["order"]["neurons"]]
    ranking = PatchOrder(neurons, [], [], 0.0, "").ranking(masks)
    target = row["auto"][4][0][3]
    rows = []
    for k in range(kmax + 1):
        net = prune(model, ranking, number=k).eval()
        m = evaluate(net, *test, attack)
        acc = float((predict(net, clean[0], 512) == clean[1]).float().mean())
        shares = {str(a) + (f"@s{sd}" if sd else ""): round(share(net, *clean, target, a, sd), 4)
                  for a in areas for sd in seeds}
        rows.append(dict(k=k, acc=m["acc"], asr=m["asr"], defender_acc=acc, shares=shares))
        print(f"{name} k={k:2d} ACC {100*m['acc']:.1f} ASR {100*m['asr']:.1f} defender {100*acc:.1f} "
              + " ".join(f"{a}:{v:.2f}" for a, v in shares.items()), flush=True)
    out[name] = dict(before=before, target=target, ordered=len(neurons), chosen=row["auto"][0], curve=rows,
                     neurons=sum(m.numel() for m in masks.values()))
    print(name, f"{time.time() - t0:.0f} s", flush=True)
tag = "_".join(n.replace(":", "-") for n in names)[:60]
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"ladder-{tag}.json"), "w"), indent=1)
