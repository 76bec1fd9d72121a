"""Ensemble ANP masks (K = 4, member k = the single run with seed k) for the CIFAR-10 CPU-scale subjects:
python masks.py badnets,blend 0,1 (attacks, subject seeds); THREADS (2) threads; EPS (the paper's 0.4, or "auto":
fastpurify.anp_eps)."""
import os, sys, time, torch
from common import subject
from fastpurify.engines.anp import anp
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
eps = os.environ.get("EPS", "0.4")
eps = eps if eps == "auto" else float(eps)
for attack in sys.argv[1].split(","):
    for seed in [int(s) for s in sys.argv[2].split(",")]:
        name = f"{attack}-s{seed}"
        model, _, clean, _ = subject(name)
        t = time.perf_counter()
        r = anp(model, clean, eps=eps, iterations=500, seeds=4, seed=0, device="cpu", progress=False)
        print(attack, seed, "ensemble K=4, eps", r.settings["eps"], round(time.perf_counter() - t, 1), "s", flush=True)
        torch.save({"members": r.members, "mean": r.masks, "seconds": r.seconds, "eps_auto": r.settings.get("eps_auto")},
                   os.path.join(os.environ.get("MASKS", "masks"), f"{name}.pt"))
