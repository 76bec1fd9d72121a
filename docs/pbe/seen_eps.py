"""A candidate rule, measured: eps read from the PGD examples as the fine-tuning sees them.
python seen_eps.py digits-<attack>-<seed>: the smallest k/255 (6-32, eps="auto"'s search:
fastpurify.calibration.smallest_bound) at which 80 % of the 100 clean images' PGD examples are
misclassified after the crop (padding 2, 4 draws), then PBE with a clean set (defaults otherwise,
PGD once per round) at PBE seeds 0-4; prints the shares read, and (ACC drop, ASR) per seed."""
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from augmented_share import pgd_examples, seen_wrong
from digits_subjects import subject
from fastpurify.calibration import smallest_bound
from fastpurify.engines.pbe import pbe

name = sys.argv[1]
model, attack, poisoned, test = subject(name)
x, y = test[0][:100], test[1][:100]
k, _, shares = smallest_bound(
    lambda k: seen_wrong(model, pgd_examples(model, x, y, k), y, torch.Generator().manual_seed(0), 2, False))
res = []
for s in range(5):
    _, rep = pbe(model, clean_data=(x, y), test_data=(test[0][100:], test[1][100:]), attack=attack,
                 progress=False, device="cpu", seed=s, eps=k / 255)
    d = rep.summary(); r = d["rounds"][-1]
    res.append((round(100 * (d["before"]["acc"] - r["acc"]), 1), round(100 * r["asr"], 1)))
print(name, f"eps {k}/255", {f"{a}/255": round(b, 2) for a, b in sorted(shares.items())}, res,
      sum(a <= 3 and b <= 5 for a, b in res), flush=True)
