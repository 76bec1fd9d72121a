"""Poisoned share of the images in each band of the infected model's training loss (global quantiles)."""
import json, sys, os, torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "anp-selection")); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch.nn.functional as F
from separability import load  # noqa: E402

for name in sys.argv[1].split(","):
    model, p = load(name)
    x, y = p.images, p.labels
    with torch.no_grad():
        loss = torch.cat([F.cross_entropy(model(x[i:i + 512]), y[i:i + 512], reduction="none") for i in range(0, len(y), 512)])
    order = loss.argsort()
    n = len(y)
    shares = []
    for lo, hi in [(0, .1), (.1, .2), (.2, .5), (.5, .8), (.8, .9), (.9, 1.0)]:
        band = order[int(lo * n):int(hi * n)]
        shares.append(f"{lo:.1f}-{hi:.1f}: {float(p.is_poisoned[band].double().mean()):.3f}")
    mid = order[int(.2 * n):int(.8 * n)]
    print(name, "; ".join(shares), "| middle 0.2-0.8:", round(float(p.is_poisoned[mid].double().mean()), 3), flush=True)
