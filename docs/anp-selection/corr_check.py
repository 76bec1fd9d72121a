"""Tenth round: at the auto rule's stop k, the pruned model with its stored BatchNorm statistics and with them moved
by what the pruning changed on the defender's images (fastpurify.bn_statistics' correction): ACC / ASR on the whole
test set, the defender's clean accuracy, and the reconstructed patch's share toward the suspected target (SEEDS, 0-2).
python corr_check.py SUBJECT:K[/K...][,SUBJECT:K] AREA ORDER_JSON[,...] -> OUT/corr<TAG>-<subjects>.json.
Environment: AUG (10: passes of the augmentation, PAD 4, FLIP 1, RECAL_BATCH 128; AUG=0: one pass of the images as
they are, fastpurify.bn_statistics with RECAL_BATCH=500), TAG, THREADS (1)."""
import copy, json, os, sys, time
import torch
import torch.nn as nn
from common import mask_sets, recalibrated, subject
from fastpurify.backdoor import evaluate
from fastpurify.inference import predict
from fastpurify.patch_order import PatchOrder
from fastpurify.patch_trigger import reconstruct_patch
from fastpurify.pruning import prune

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
BATCH, AUG = int(os.environ.get("RECAL_BATCH", "128")), int(os.environ.get("AUG", "10"))
PAD, FLIP = int(os.environ.get("PAD", "4")), os.environ.get("FLIP", "1") == "1"
SEEDS = [int(s) for s in os.environ.get("SEEDS", "0,1,2").split(",")]
BN = nn.modules.batchnorm._BatchNorm


def recalibrated_stats(net, images):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in recalibrated(net, images, AUG, BATCH, PAD, FLIP).modules()
            if isinstance(m, BN)]


def corrected(net, base, images):
    out = copy.deepcopy(net)
    for m, (rm, rv), (bm, bv) in zip([m for m in out.modules() if isinstance(m, BN)], recalibrated_stats(net, images), base):
        m.running_mean.add_(rm - bm)
        m.running_var.mul_(rv / bv)
    return out.eval()


def share(net, images, labels, target, area, seed):
    others = images[labels != target]
    mask, pattern = reconstruct_patch(net, others, target, area=area, steps=100, batch_size=512, seed=seed)
    return float((predict(net, (1 - mask) * others + mask * pattern, 512) == target).float().mean())


source = {}
for path in sys.argv[3].split(","):
    source.update(json.load(open(path)))
area = float(sys.argv[2])
out = {}
for item in sys.argv[1].split(","):
    t0 = time.time()
    name, ks = item.split(":")
    model, attack, clean, test = subject(name)
    model.eval()
    row = source[f"{name}/mean"]
    target = row["auto"][4][0][3]
    ranking = PatchOrder([tuple(n) for n in row["order"]["neurons"]], [], [], 0.0, "").ranking(mask_sets(name)["mean"])
    base = recalibrated_stats(model, clean[0])
    m0 = evaluate(model, *test, attack)
    res = {}
    for k in [int(v) for v in ks.split("/")]:
        net = prune(model, ranking, number=k).eval()
        for tag, n in (("stored", net), ("corrected", corrected(net, base, clean[0]))):
            m = evaluate(n, *test, attack)
            d = float((predict(n, clean[0], 512) == clean[1]).float().mean())
            sh = [round(share(n, *clean, target, area, s), 3) for s in SEEDS]
            res[f"{k}/{tag}"] = dict(acc=m["acc"], asr=m["asr"], defender_acc=d, shares=sh)
            print(f"{name} k={k} {tag:9s} ACC {100*m['acc']:.1f} ASR {100*m['asr']:.1f} (drop {100*(m0['acc']-m['acc']):.1f}) "
                  f"defender {100*d:.1f} patch shares {sh}", flush=True)
    out[name] = dict(before=m0, target=target, area=area, results=res)
    print(name, f"{time.time() - t0:.0f} s", flush=True)
tag = "_".join(i.split(":")[0] for i in sys.argv[1].split(","))[:60]
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"corr{os.environ.get('TAG', '')}-{tag}.json"), "w"), indent=1)
