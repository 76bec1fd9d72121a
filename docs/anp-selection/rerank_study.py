"""One-shot rankings from a trigger reconstructed toward t = 0 (evaluation uses the trigger; never a choice):
python rerank_study.py SUBJECTS. anp (the mean mask), taylor (first-order effect of pruning each neuron on the patch's
target loss minus on the clean loss), taylor_p (the patch's only), ablate / ablate_p (the same, exact: each neuron
pruned alone), ablate_ratio, and rank sums with ANP's; the curve on the fixed random 2,000 test images, k = 0..30."""
import os, sys, json, time, torch, torch.nn as nn, torch.nn.functional as F
from common import evaluation_subject, mask_sets
from fastpurify.backdoor import evaluate
from fastpurify.pruning import prune
from fastpurify.selection import reconstruct_patch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
T = 0

def bn_layers(model, masks):
    mods = dict(model.named_modules())
    return {n: mods[n] for n in masks}

def as_masks(score, masks):
    """score: flat tensor (higher = prune first) -> pseudo masks whose ascending order is descending score."""
    order = torch.argsort(-score, stable=True)
    rank = torch.empty_like(score); rank[order] = torch.arange(score.numel(), dtype=score.dtype) / score.numel()
    return dict(zip(masks, rank.split([m.numel() for m in masks.values()])))

def keep(outs, n, o):
    y = o.clone(); y.retain_grad(); outs[n] = y
    return y.clone()

def taylor(model, masks, x, y, target):
    layers = bn_layers(model, masks); outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: keep(outs, n, o)) for n, m in layers.items()]
    net = model.eval()
    logits = net(x.clone().requires_grad_(True))
    loss = F.cross_entropy(logits, y) if target is None else F.cross_entropy(logits, torch.full_like(y, target))
    loss.backward()
    s = []
    for n, m in layers.items():
        o = outs[n]; beta = m.bias.view(1, -1, 1, 1)
        s.append(((beta - o) * o.grad).sum(dim=(2, 3)).mean(0).detach() * x.shape[0])
    for h in hooks: h.remove()
    model.zero_grad(set_to_none=True)
    return torch.cat(s)

@torch.no_grad()
def ablate(model, masks, xp, yp, xc, yc, target):
    base_p = F.cross_entropy(model(xp), torch.full_like(yp, target)).item()
    base_c = F.cross_entropy(model(xc), yc).item()
    layers = bn_layers(model, masks); sp, sc = [], []
    for n, m in layers.items():
        for c in range(m.weight.numel()):
            w = m.weight[c].item(); m.weight[c] = 0.0
            sp.append(F.cross_entropy(model(xp), torch.full_like(yp, target)).item() - base_p)
            sc.append(F.cross_entropy(model(xc), yc).item() - base_c)
            m.weight[c] = w
    return torch.tensor(sp), torch.tensor(sc)

out = {}
for name in sys.argv[1].split(","):
    model, attack, clean, test, base = evaluation_subject(name)
    xc, yc = clean
    others = xc[yc != T]
    t0 = time.time()
    cache = os.environ.get("OUT", ".") + f"/patch-{name}.pt"
    if os.path.exists(cache):
        mask, pattern = torch.load(cache)
    else:
        mask, pattern = reconstruct_patch(model, others, T, area=0.01, steps=100, batch_size=512)
        torch.save((mask, pattern), cache)
    xp = (1 - mask) * others + mask * pattern
    print(name, "patch", round(time.time() - t0, 1), "s; share", (model(xp).argmax(1) == T).float().mean().item(), flush=True)
    sets = mask_sets(name); anp_m = sets["mean"]
    anp_score = -torch.cat([m.float() for m in anp_m.values()])
    tp = taylor(model, anp_m, xp, yc[yc != T], T)
    tc = taylor(model, anp_m, xc, yc, None)
    ap, ac = ablate(model, anp_m, xp, yc[yc != T], xc, yc, T)
    def r(v): return torch.argsort(torch.argsort(v)).float()  # ascending rank
    rankings = {"anp": anp_score, "taylor": tp - tc, "taylor_p": tp, "ablate": ap - ac, "ablate_p": ap,
                "ablate_ratio": ap / (ac.clamp(min=0) + 0.01),
                "anp+taylor": r(anp_score) + r(tp - tc), "anp+ablate": r(anp_score) + r(ap - ac)}
    res = {}
    for label, score in rankings.items():
        pm = as_masks(score, anp_m); curve = []
        for k in range(0, 31):
            m = evaluate(prune(model, pm, number=k) if k else model, *test, attack)
            curve.append((k, round(m["acc"], 4), None if attack is None else round(m["asr"], 4)))
        first = lambda lim: next(((k, round(100 * (base["acc"] - a), 1)) for k, a, s in curve if s is not None and s <= lim), None)
        res[label] = dict(asr10=first(0.10), asr5=first(0.05), curve=curve)
        print(f"{name:11s} {label:13s} ASR<=10 {res[label]['asr10']} ASR<=5 {res[label]['asr5']} |",
              " ".join(f"{k}:{100*a:.0f}/{'-' if s is None else round(100*s)}" for k, a, s in curve[::2]), flush=True)
    out[name] = res
    json.dump(out, open(os.environ.get("OUT", ".") + f"/rerank-{sys.argv[1].replace(',', '_')}.json", "w"))
