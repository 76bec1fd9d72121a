"""Does fine-tuning see adversarial examples? python augmented_share.py digits|cifar SUBJECT[,SUBJECT] > out.jsonl

With ``regenerate="round"`` PBE makes the extra set's PGD examples once (eval mode, unaugmented)
and the fine-tuning then draws them through the crop-and-flip augmentation. For each bound k/255
this prints the share of the examples the infected model misclassifies as made, and after the
augmentation the run would apply (padding and flips as "auto" resolves them; 4 draws), and the
share of the clean images it misclassifies after the same augmentation (the floor)."""
import json, os, sys
import torch
from fastpurify.data.sampler import augment_batch
from fastpurify.inference import predict_logits
from fastpurify.reference.pgd import pgd

BOUNDS = [6, 8, 12, 16, 20, 24, 32]
DRAWS = 4  # augmentation draws averaged per share


def pgd_examples(model, x, y, k):
    """The run's PGD examples at k/255 (7 steps of eps/5, no random start), as PBE makes them."""
    return pgd(model, x, y, eps=k / 255, alpha=k / 255 / 5, steps=7, random_start=False, batch_size=128)


def wrong(model, images, y):
    """The share of ``images`` the model labels other than ``y``."""
    return float((predict_logits(model, images, 256).argmax(1) != y).double().mean())


def seen_wrong(model, images, y, generator, padding, flip):
    """:func:`wrong` on ``images`` as the fine-tuning sees them: the mean over DRAWS augmentations."""
    return sum(wrong(model, augment_batch(images, generator, padding, flip), y) for _ in range(DRAWS)) / DRAWS


def main(kind, names):
    from fastpurify.calibration import auto_padding, flip_accuracy, FLIP_RETAINED
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
            s = get_subject(split, cfg, attack_name, int(seed), recipe=cfg.recipe, device=torch.device("cpu"),
                            cache=cache, progress=False)
            model = s.model.eval()
            x, y = split.reserve[0][:500], split.reserve[1][:500]
        padding = auto_padding(*x.shape[-2:])
        acc, flipped = flip_accuracy(model, x, y, 128)
        flip = flipped >= FLIP_RETAINED * acc
        g = torch.Generator().manual_seed(0)
        floor = seen_wrong(model, x, y, g, padding, flip)
        row = {"kind": kind, "subject": name, "padding": padding, "flip": bool(flip),
               "clean_augmented_wrong": round(floor, 4), "bounds": {}}
        for k in BOUNDS:
            adv = pgd_examples(model, x, y, k)
            aug = seen_wrong(model, adv, y, g, padding, flip)
            row["bounds"][f"{k}/255"] = {"as_made": round(wrong(model, adv, y), 4), "augmented": round(aug, 4)}
        print(json.dumps(row), flush=True)


here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "anp-selection"))  # common.py: the CIFAR-10 subjects
sys.path.insert(0, here)  # before it: this folder's digits_subjects.py (anp-selection has its own)
if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    main(sys.argv[1], sys.argv[2].split(","))
