"""A candidate rule, measured: eps read from the PGD examples as the fine-tuning sees them.
python seen_eps.py digits-<attack>-<seed>: the smallest k/255 (6-32, binary search as eps="auto")
at which 80 % of the 100 clean images' PGD examples are misclassified after the crop (padding 2,
4 draws), then PBE with a clean set (defaults otherwise, PGD once per round) at PBE seeds 0-4;
prints the shares read, and (ACC drop, ASR) per seed."""
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_subjects import subject
from fastpurify.data.sampler import augment_batch
from fastpurify.inference import predict_logits
from fastpurify.reference.pgd import pgd
from fastpurify.engines.pbe import pbe
name = sys.argv[1]
model, attack, poisoned, test = subject(name)
x, y = test[0][:100], test[1][:100]
def seen(k):
    g = torch.Generator().manual_seed(0)
    adv = pgd(model, x, y, eps=k/255, alpha=k/255/5, steps=7, random_start=False, batch_size=128)
    return sum(float((predict_logits(model, augment_batch(adv, g, 2, False), 256).argmax(1) != y).double().mean()) for _ in range(4)) / 4
lo, hi = 6, 32
shares = {}
if (shares.setdefault(lo, seen(lo))) >= 0.8: k = lo
elif (shares.setdefault(hi, seen(hi))) < 0.8: k = hi
else:
    while hi - lo > 1:
        m = (lo + hi) // 2; shares[m] = seen(m)
        if shares[m] >= 0.8: hi = m
        else: lo = m
    k = hi
res = []
for s in range(5):
    _, rep = pbe(model, clean_data=(test[0][:100], test[1][:100]), test_data=(test[0][100:], test[1][100:]), attack=attack,
                 progress=False, device="cpu", seed=s, eps=k/255)
    d = rep.summary(); r = d["rounds"][-1]
    res.append((round(100*(d["before"]["acc"]-r["acc"]), 1), round(100*r["asr"], 1)))
print(name, f"eps {k}/255", {f"{a}/255": round(b, 2) for a, b in sorted(shares.items())}, res, sum(a <= 3 and b <= 5 for a, b in res), flush=True)
