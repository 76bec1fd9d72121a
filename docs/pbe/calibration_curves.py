"""What eps="auto" and flip="auto" read, on a grid: the share of 1,000 training images (the poisoned
set as the defender holds it; seeded draw) and of the defender's clean images whose PGD examples
(7 steps of eps/5, no random start) the infected model misclassifies, and its accuracy on the
images and on them flipped. python calibration_curves.py SUBJECT[,SUBJECT] > calibration-curves.jsonl
(digits-<attack>-<seed> from DIGITS, <attack>-s<seed> from CIFAR / SUBJECTS, as the other scripts)."""
import json, os, sys
import torch
torch.set_num_threads(1)
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "anp-selection"))
sys.path.insert(0, here)  # digits_subjects: this folder's (the anp-selection one trains at import)
from fastpurify.inference import predict_logits
from fastpurify.reference.pgd import pgd

GRID = [4, 6, 8, 12, 16, 24, 32]


def stats(model, x, y):
    out = {}
    with torch.no_grad():
        p = predict_logits(model, x, 128).argmax(1)
        pf = predict_logits(model, x.flip(-1), 128).argmax(1)
    out["acc"] = float((p == y).float().mean())
    out["acc_flip"] = float((pf == y).float().mean())
    out["agree_flip"] = float((p == pf).float().mean())
    for e in GRID:
        xa = pgd(model, x, y, eps=e / 255, alpha=e / 255 / 5, steps=7, random_start=False, batch_size=128)
        with torch.no_grad():
            out[f"mis{e}"] = float((predict_logits(model, xa, 128).argmax(1) != y).float().mean())
    return out


g = torch.Generator().manual_seed(0)
for name in sys.argv[1].split(","):
    if name.startswith("digits"):
        from digits_subjects import subject
        model, attack, poisoned, test = subject(name)
        train, clean = (poisoned.images, poisoned.labels), (test[0][:100], test[1][:100])
    else:
        from common import cifar
        from fastpurify.reproduce.subjects import get_subject
        cfg, split, cache = cifar()
        attack_name, seed = name.split("-s")
        s = get_subject(split, cfg, attack_name, int(seed), recipe=cfg.recipe, device=torch.device("cpu"), cache=cache,
                        progress=False)
        model, train = s.model.eval(), (s.poisoned.images, s.poisoned.labels)
        clean = split.reserve[0][:500], split.reserve[1][:500]
    pick = torch.randperm(train[0].shape[0], generator=g)[:1000]
    print(json.dumps({"subject": name, "train": stats(model, train[0][pick].float(), train[1][pick]),
                      "clean": stats(model, clean[0].float(), clean[1])}), flush=True)
