"""How well the infected model's own statistics separate poisoned from clean training images:
AP (clean = positive) of rankings by clean loss, by PGD loss (eps 6/255 and 12/255, 7 steps), and the poisoned share of
the 5 % picked by the class-balanced top of each score."""
import json, sys, os, torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "anp-selection")); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch.nn.functional as F
from fastpurify.ranking import average_precision, rank_descending
from fastpurify.reference.pgd import pgd


def load(name):
    if name.startswith("digits"):
        from digits_subjects import subject
        model, attack, p, _ = subject(name)
        return model, p
    from common import cifar
    from fastpurify.reproduce.subjects import get_subject
    cfg, split, cache = cifar()
    a, s = name.split("-s")
    sub = get_subject(split, cfg, a, int(s), recipe=cfg.recipe, device=torch.device("cpu"), cache=cache, progress=False)
    return sub.model.eval(), sub.poisoned


def balanced_top(score, labels, frac):
    """Per class, the top frac of that class by score (high = cleanest)."""
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        k = max(1, int(round(frac * idx.numel())))
        keep.append(idx[score[idx].argsort(descending=True)[:k]])
    return torch.cat(keep)


if __name__ == "__main__":
  for name in sys.argv[1].split(","):
      model, p = load(name)
      x, y = p.images, p.labels
      clean = ~p.is_poisoned
      with torch.no_grad():
          loss = torch.cat([F.cross_entropy(model(x[i:i + 512]), y[i:i + 512], reduction="none") for i in range(0, len(y), 512)])
      out = {"subject": name, "n": len(y), "poisoned": int(p.is_poisoned.sum())}
      scores = {"clean_loss": loss}
      for eps in (6, 12):
          adv = pgd(model, x, y, eps=eps / 255, alpha=eps / 255 / 5, steps=7, random_start=False, batch_size=256)
          with torch.no_grad():
              logits = torch.cat([model(adv[i:i + 512]) for i in range(0, len(y), 512)])
          scores[f"adv_loss_{eps}"] = F.cross_entropy(logits, y, reduction="none")
          scores[f"flipped_{eps}"] = (logits.argmax(1) != y).double() + 1e-6 * scores[f"adv_loss_{eps}"]
      for k, s in scores.items():
          top = balanced_top(s, y, 0.05)
          out[k] = {"ap": round(average_precision(rank_descending(s), clean), 3),
                    "top5_poisoned": round(float(p.is_poisoned[top].double().mean()), 4)}
      out["chance_ap"] = round(float(clean.double().mean()), 3)
      print(json.dumps(out), flush=True)
      with open(os.path.join(os.environ.get("OUT", "."), "separability.jsonl"), "a") as fh:
          fh.write(json.dumps(out) + "\n")
