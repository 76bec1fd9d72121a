"""Does a smaller ANP eps rank the backdoor neurons first on the CPU-scale CIFAR-10 subjects?
python eps_study.py SUBJECTS EPSES [ITERATIONS] (an eps may be "auto": fastpurify.anp_eps) (environment as common.py, plus MASKS, OUT, THREADS, MAX_K):
K = 4 ensembles (seeds 0..3) per eps; the ranking curve of the mean mask on a fixed random 2,000 test images,
k = 0..MAX_K (ASR uses the trigger: evaluation only, never a choice)."""
import os, sys, json, time, torch
from common import subject
from fastpurify.engines.anp import anp
from fastpurify.backdoor import evaluate
from fastpurify.pruning import prune, count_pruned
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
iters = int(sys.argv[3]) if len(sys.argv) > 3 else 500
out_path = os.environ.get("OUT", ".") + f"/eps-{sys.argv[1].replace(',', '_')}-{iters}.json"
out = json.load(open(out_path)) if os.path.exists(out_path) else {}
for name in sys.argv[1].split(","):
    model, attack, clean, test = subject(name)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(test[1].numel(), generator=g)[:2000]
    test = (test[0][idx], test[1][idx])
    base = evaluate(model, *test, attack)
    print(name, "base", base, flush=True)
    for eps in [e if e == "auto" else float(e) for e in sys.argv[2].split(",")]:
        key = f"{name}/eps{eps}"
        if key in out:
            continue
        t = time.perf_counter()
        r = anp(model, clean, eps=eps, iterations=iters, seeds=4, seed=0, device="cpu", progress=False)
        secs = time.perf_counter() - t
        torch.save({"members": r.members, "mean": r.masks}, os.environ.get("MASKS", ".") + f"/{name}-eps{eps}-{iters}.pt")
        curve = []
        for k in range(0, int(os.environ.get("MAX_K", "30")) + 1):
            m = evaluate(prune(model, r.masks, number=k) if k else model, *test, attack)
            curve.append((k, round(m["acc"], 4), round(m["asr"], 4)))
        first = lambda lim: next(((k, round(100 * (base["acc"] - a), 1)) for k, a, s in curve if s <= lim), None)
        out[key] = dict(seconds=round(secs, 1), thr=count_pruned(r.masks, threshold=0.2), asr10=first(0.10),
                        asr5=first(0.05), curve=curve, loss_last=r.loss[-50:], eps_auto=r.settings.get("eps_auto"))
        print(f"{key}: {secs:.0f} s thr0.2 k={out[key]['thr']} ASR<=10 at {out[key]['asr10']} ASR<=5 at {out[key]['asr5']}",
              flush=True)
        print("   ", " ".join(f"{k}:{100*a:.0f}/{100*s:.0f}" for k, a, s in curve), flush=True)
        json.dump(out, open(out_path, "w"))
