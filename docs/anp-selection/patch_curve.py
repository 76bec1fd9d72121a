"""The patch probe's curve against the truth (the prototype of fastpurify.selection.reconstruct_patch: the same
initialisation, Adam lr 0.1, area penalty 50 and top-area mask, on all images at once): after pruning k neurons of a
mask set, a trigger is reconstructed toward the target t (0) on the defender's images not of class t; printed are the
test ACC and ASR (the trigger, for evaluation only), the share the soft mask sends to t (its mean area) and the share
the hard mask of round(A * H * W) pixels sends ("hard": the probe's statistic); at k = 0 also toward classes 1 and 2.
python patch_curve.py SUBJECT SET AREA STEPS K,K,... (paths as common.py; THREADS)."""
import os, sys, json, time, torch, torch.nn.functional as F
from common import mask_sets, subject
from fastpurify.backdoor import evaluate
from fastpurify.pruning import prune
torch.set_num_threads(int(os.environ.get("THREADS", "1")))

def reconstruct(model, images, t, area, steps, lr=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    m_logit = (torch.randn(1, 1, h, w, generator=g) * 0.1 - 3).requires_grad_(True)
    p_logit = (torch.randn(1, c, h, w, generator=g) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([m_logit, p_logit], lr=lr)
    tgt = torch.full((n,), t)
    for s in range(steps):
        m, p = torch.sigmoid(m_logit), torch.sigmoid(p_logit)
        x = (1 - m) * images + m * p
        loss = F.cross_entropy(model(x), tgt) + 50 * F.relu(m.mean() - area)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        m, p = torch.sigmoid(m_logit), torch.sigmoid(p_logit)
        pred = model((1 - m) * images + m * p).argmax(1)
        top = m.flatten().topk(max(1, round(area * h * w))).indices
        hard = torch.zeros(h * w); hard[top] = 1; hard = hard.view(1, 1, h, w)
        pred_h = model((1 - hard) * images + hard * p).argmax(1)
    return float((pred == t).float().mean()), float(m.mean()), float((pred_h == t).float().mean())

name, label = sys.argv[1], sys.argv[2]
area, steps = float(sys.argv[3]), int(sys.argv[4])
ks = [int(k) for k in sys.argv[5].split(",")]
model, attack, clean, test = subject(name)
if not name.startswith("digits"):
    gg = torch.Generator().manual_seed(0); idx = torch.randperm(test[1].numel(), generator=gg)[:2000]
    test = (test[0][idx], test[1][idx])
masks = mask_sets(name)[label]
x, y = clean
t = 0
others = x[y != t]
for p in model.parameters(): p.requires_grad_(False)
for k in ks:
    net = (prune(model, masks, number=k) if k else model).eval()
    for p in net.parameters(): p.requires_grad_(False)
    t0 = time.time()
    res = [reconstruct(net, others, c, area, steps) for c in ([t] + ([1, 2] if k == 0 else []))]
    m = evaluate(net, *test, attack)
    print(f"{name} {label} k={k:3d} ACC {100*m['acc']:.1f} ASR {100*m['asr']:.1f} | flip->t {res[0][0]:.2f} (area {res[0][1]:.3f}) hard {res[0][2]:.2f}" +
          (f" | other classes {[(round(r[0],2), round(r[2],2)) for r in res[1:]]}" if k == 0 else "") + f" {time.time()-t0:.1f}s", flush=True)
