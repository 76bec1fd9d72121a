"""The patch toward every class on an unpruned model (Neural Cleanse's outlier test, read as a share): for each class c,
a 1 % patch reconstructed toward c on the defender's images not of class c, and the share it sends there
(fastpurify.selection.reconstruct_patch, its defaults). python patch_classes.py digits-badnets-0,digits-clean-0,...
(paths as common.py; THREADS)."""
import os, sys, torch
from common import subject
from fastpurify.inference import predict
from fastpurify.selection import DEFAULT_EPS, DEFAULT_STEPS, reconstruct_patch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
for name in sys.argv[1].split(","):
    model, _, (x, y), _ = subject(name)
    for p in model.parameters():
        p.requires_grad_(False)
    shares = []
    for c in range(10):
        others = x[y != c]
        mask, pattern = reconstruct_patch(model, others, c, area=DEFAULT_EPS["patch"], steps=DEFAULT_STEPS["patch"],
                                          batch_size=512)
        shares.append((predict(model, (1 - mask) * others + mask * pattern) == c).float().mean().item())
    print(name, " ".join(f"{c}:{s:.2f}" for c, s in enumerate(shares)), flush=True)
