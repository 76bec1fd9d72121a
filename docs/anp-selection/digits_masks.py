"""Ensemble masks (K = 4, member k = the single run with seed k) for the digits subjects:
python digits_masks.py [NAMES] (default badnets-0; DIGITS, MASKS folders; EPS the paper's 0.4 or "auto":
fastpurify.anp_eps)."""
import os, sys, torch
import fastpurify
from fastpurify.data import load_digits, train_test_split
from fastpurify.models import small_cnn
torch.set_num_threads(1)
images, labels = load_digits(size=16)
train, test = train_test_split(images, labels, 0.2, seed=0)
clean = test[0][:100], test[1][:100]
eps = os.environ.get("EPS", "0.4")
eps = eps if eps == "auto" else float(eps)
for name in (sys.argv[1] if len(sys.argv) > 1 else "badnets-0").split(","):
    model = small_cnn(num_classes=10, in_channels=1, width=32)
    model.load_state_dict(torch.load(os.path.join(os.environ.get("DIGITS", "."), f"digits-{name}.pt")))
    r = fastpurify.anp(model, clean, eps=eps, iterations=1000, batch_size=64, padding=2, flip=False, seeds=4,
                       progress=False, device="cpu")
    print(name, "eps", r.settings["eps"], round(r.seconds, 1), "s", flush=True)
    torch.save({"members": r.members, "mean": r.masks, "seconds": r.seconds, "eps_auto": r.settings.get("eps_auto")},
               os.path.join(os.environ.get("MASKS", "masks"), f"digits-{name}.pt"))
