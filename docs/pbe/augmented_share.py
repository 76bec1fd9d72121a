"""Does fine-tuning see adversarial examples? python augmented_share.py digits|cifar SUBJECT[,SUBJECT] > out.jsonl

With ``regenerate="round"`` PBE makes the extra set's PGD examples once (eval mode, unaugmented)
and the fine-tuning then draws them through the crop-and-flip augmentation. For each bound k/255
this prints the share of the examples the infected model misclassifies as made, and after the
augmentation the run would apply (padding and flips as "auto" resolves them; 4 draws), and the
share of the clean images it misclassifies after the same augmentation (the floor)."""
import json, os, sys
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "anp-selection"))  # common.py: the CIFAR-10 subjects
sys.path.insert(0, here)  # before it: this folder's digits_subjects.py (anp-selection has its own)
from fastpurify.calibration import adversarial_logits, auto_padding, flip_accuracy, FLIP_RETAINED
from fastpurify.data.sampler import augment_batch
from fastpurify.inference import predict_logits
from fastpurify.reference.pgd import pgd

kind, names = sys.argv[1], sys.argv[2].split(",")
BOUNDS = [6, 8, 12, 16, 20, 24, 32]
for name in names:
    if kind == "digits":
        from digits_subjects import subject
        model, attack, poisoned, test = subject(name)
        x, y = test[0][:100], test[1][:100]
    else:
        from common import cifar
        from fastpurify.reproduce.subjects import get_subject
        cfg, split, cache = cifar()
        attack_name, seed = name.split("-s")
        s = get_subject(split, cfg, attack_name, int(seed), recipe=cfg.recipe, device=torch.device("cpu"), cache=cache,
                        progress=False)
        model = s.model.eval()
        x, y = split.reserve[0][:500], split.reserve[1][:500]
    padding = auto_padding(*x.shape[-2:])
    acc, flipped = flip_accuracy(model, x, y, 128)
    flip = flipped >= FLIP_RETAINED * acc
    g = torch.Generator().manual_seed(0)
    wrong = lambda imgs: float((predict_logits(model, imgs, 256).argmax(1) != y).double().mean())
    floor = sum(wrong(augment_batch(x, g, padding, flip)) for _ in range(4)) / 4
    row = {"kind": kind, "subject": name, "padding": padding, "flip": bool(flip), "clean_augmented_wrong": round(floor, 4),
           "bounds": {}}
    for k in BOUNDS:
        adv = pgd(model, x, y, eps=k / 255, alpha=k / 255 / 5, steps=7, random_start=False, batch_size=128)
        aug = sum(wrong(augment_batch(adv, g, padding, flip)) for _ in range(4)) / 4
        row["bounds"][f"{k}/255"] = {"as_made": round(wrong(adv), 4), "augmented": round(aug, 4)}
    print(json.dumps(row), flush=True)
