"""Tenth round: BatchNorm statistics after pruning, along the order the auto rule walked (docs/anp-selection.md).
python bn_recal.py SUBJECTS KMAX ORDER_JSON -> OUT/recal<TAG>-<subjects>.json: for k = 0..KMAX pruned neurons, ACC / ASR
on the whole test set (the trigger for evaluation only) and the defender's clean accuracy, with the stored statistics
and with statistics from the defender's 500 clean images. Environment: AUG=N (N passes of the training augmentation,
crop after PAD pixels of padding (4) and flips unless FLIP=0; AUG=0, the default: one pass of the images as they are),
RECAL_BATCH (500), DELTA=1 (the stored statistics moved by what the pruning changed, fastpurify.bn_statistics;
otherwise re-estimated outright), TAG (the output's name), THREADS (1)."""
import copy, json, os, sys, time
import torch
import torch.nn as nn
from common import mask_sets, recalibrated, subject
from fastpurify.backdoor import evaluate
from fastpurify.inference import predict
from fastpurify.patch_order import PatchOrder
from fastpurify.pruning import prune

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
names, kmax = sys.argv[1].split(","), int(sys.argv[2])
source = {}
for path in sys.argv[3].split(","):
    source.update(json.load(open(path)))
BATCH = int(os.environ.get("RECAL_BATCH", "500"))
AUG = int(os.environ.get("AUG", "0"))


def recalibrate(net, images):
    return recalibrated(net, images, AUG, BATCH, int(os.environ.get("PAD", "4")), os.environ.get("FLIP", "1") == "1")


def delta(net, base_stats, images):
    """Stored statistics moved by what pruning changed on the clean images: mean + (pruned - unpruned), var * ratio."""
    rec = recalibrate(net, images)
    out = copy.deepcopy(net)
    bns = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    rbns = [m for m in rec.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, r, (bm, bv) in zip(bns, rbns, base_stats):
        m.running_mean.add_(r.running_mean - bm)
        m.running_var.mul_(r.running_var / bv)
    return out


def stats(net):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


out = {}
for name in names:
    t0 = time.time()
    model, attack, clean, test = subject(name)
    model.eval()
    row = source[f"{name}/mean"]
    masks = mask_sets(name)["mean"]
    neurons = [tuple(n) for n in row["order"]["neurons"]]
    ranking = PatchOrder(neurons, [], [], 0.0, "").ranking(masks)
    rows = []
    for k in range(kmax + 1):
        net = prune(model, ranking, number=k).eval()
        if k == 0:
            base = stats(recalibrate(net, clean[0]))
        rec = delta(net, base, clean[0]) if os.environ.get("DELTA") else recalibrate(net, clean[0])
        a, b = evaluate(net, *test, attack), evaluate(rec, *test, attack)
        da = float((predict(net, clean[0], 512) == clean[1]).float().mean())
        db = float((predict(rec, clean[0], 512) == clean[1]).float().mean())
        rows.append(dict(k=k, acc=a["acc"], asr=a["asr"], defender_acc=da, recal_acc=b["acc"], recal_asr=b["asr"],
                         recal_defender_acc=db))
        print(f"{name} k={k:2d} stored ACC {100*a['acc']:.1f} ASR {100*a['asr']:.1f} def {100*da:.1f} | recal ACC "
              f"{100*b['acc']:.1f} ASR {100*b['asr']:.1f} def {100*db:.1f}", flush=True)
    out[name] = dict(chosen=row["auto"][0], curve=rows)
    print(name, f"{time.time() - t0:.0f} s", flush=True)
tag = "_".join(names)[:60]
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"recal{os.environ.get('TAG', '')}-{tag}.json"), "w"), indent=1)
