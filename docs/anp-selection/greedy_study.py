"""The prototype of fastpurify.patch_order (evaluation uses the trigger; never a choice): python greedy_study.py
SUBJECTS LAM:R:M[,...] — a trigger reconstructed toward t = 0 on the defender's images (again every R prunings);
each step the neuron whose exact pruning most raises that patch's target loss among those keeping the defender's
clean accuracy within LAM points of the unpruned model's; candidates ANP's lowest M masks (0: all); K = 12 steps.
(A first version scored loss rise minus LAM times the clean-loss rise: docs/anp-selection.md.) The curve along the
order on the fixed random 2,000 test images."""
import os, sys, json, time, torch, torch.nn.functional as F
from common import evaluation_subject, mask_sets
from fastpurify.backdoor import evaluate
from fastpurify.pruning import prune
from fastpurify.selection import reconstruct_patch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
T, K = 0, 12
variants = [dict(lam=float(l), R=int(r), M=int(m)) for l, r, m in (v.split(":") for v in sys.argv[2].split(","))]
out = {}
for name in sys.argv[1].split(","):
    model, attack, clean, test, base = evaluation_subject(name)
    xc, yc = clean
    others = xc[yc != T]
    anp_m = mask_sets(name)["mean"]
    mods = dict(model.named_modules())
    flat = [(n, c) for n, m in anp_m.items() for c in range(m.numel())]
    anp_order = torch.argsort(torch.cat([m.float() for m in anp_m.values()]), stable=True).tolist()
    for v in variants:
        net = __import__("copy").deepcopy(model); nm = dict(net.named_modules())
        pool = set(anp_order[:v["M"]]) if v["M"] else set(range(len(flat)))
        order, t0 = [], time.time()
        for step in range(K):
            if step % v["R"] == 0:
                mask, pattern = reconstruct_patch(net, others, T, area=0.01, steps=100, batch_size=512, seed=step)
                xp = (1 - mask) * others + mask * pattern; tp = torch.full((xp.shape[0],), T)
            with torch.no_grad():
                lp0 = F.cross_entropy(net(xp), tp).item()
                if step == 0: acc0 = (net(xc).argmax(1) == yc).float().mean().item()
                best = None
                for i in pool - set(order):
                    n, c = flat[i]; w = nm[n].weight[c].item(); nm[n].weight[c] = 0.0
                    acc = (net(xc).argmax(1) == yc).float().mean().item()
                    s = F.cross_entropy(net(xp), tp).item() - lp0 if acc >= acc0 - v["lam"] / 100 else -1e9 + acc
                    nm[n].weight[c] = w
                    if best is None or s > best[0]: best = (s, i)
                if best is None: break
                order.append(best[1]); n, c = flat[best[1]]; nm[n].weight[c] = 0.0
        secs = time.time() - t0
        curve = [(0, base["acc"], base.get("asr"))]
        for k in range(1, len(order) + 1):
            pm = {n: torch.ones_like(m) for n, m in anp_m.items()}
            for i in order[:k]:
                n, c = flat[i]; pm[n][c] = 0.0
            m = evaluate(prune(model, pm, number=k), *test, attack)
            curve.append((k, round(m["acc"], 4), None if attack is None else round(m["asr"], 4)))
        first = lambda lim: next(((k, round(100 * (base["acc"] - a), 1)) for k, a, s in curve if s is not None and s <= lim), None)
        key = f"lam{v['lam']}-R{v['R']}-M{v['M']}"
        out.setdefault(name, {})[key] = dict(asr10=first(0.10), asr5=first(0.05), curve=curve, order=order, seconds=secs)
        print(f"{name:11s} {key:16s} {secs:.0f}s ASR<=10 {first(0.10)} ASR<=5 {first(0.05)} |",
              " ".join(f"{k}:{100*a:.0f}/{'-' if s is None else round(100*s)}" for k, a, s in curve[::2]), flush=True)
        json.dump(out, open(os.environ.get("OUT", ".") + f"/greedy-{sys.argv[1].replace(',', '_')}-{sys.argv[2].replace(':', '').replace(',', '_')}.json", "w"))
