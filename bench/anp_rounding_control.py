"""ANP's outcome under a rounding change (bench/NOTES.md, 2026-11-27, second session).

Per seed, three 1000-iteration fastpurify.anp runs on the end-to-end BadNets digits subject
(tests/test_end_to_end.py's settings), each pruned by the clean-data rule (max_drop 0) and
evaluated on the 259 held-out images:
  ref   NCHW: the reference's arithmetic bit for bit;
  cl    channels_last (the CPU default for float32 models);
  ctrl  NCHW on a copy of the model whose conv / linear weights each move by one ulp (random sign).

    .venv/bin/python bench/anp_rounding_control.py 0,1,2 ref,cl,ctrl   # ~4 CPU-minutes per seed
"""

import copy
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests.digits_subjects

import fastpurify  # noqa: E402
from fastpurify.backdoor import BadNets, evaluate  # noqa: E402
from fastpurify.pruning import prune, prune_by_clean_accuracy, select_neurons  # noqa: E402
from tests.digits_subjects import digits_subject  # noqa: E402

SETTINGS = dict(iterations=1000, batch_size=64, clamp_noise=True, padding=2, flip=False, progress=False)


def nudged(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy whose conv / linear weights each move one ulp up or down (the sign drawn per element)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                up = torch.rand(m.weight.shape, generator=g) < 0.5
                inf = torch.full_like(m.weight, float("inf"))
                m.weight.copy_(torch.where(up, torch.nextafter(m.weight, inf), torch.nextafter(m.weight, -inf)))
    return model


def main(seeds: list[int], arms: list[str]) -> None:
    fastpurify.keep_freed_memory()
    torch.set_num_threads(1)
    subject, test = digits_subject(BadNets(num_classes=10, target=0), width=32, epochs=15)
    clean, held = (test[0][:100], test[1][:100]), (test[0][100:], test[1][100:])
    for seed in seeds:
        for arm in arms:
            model = nudged(subject.model, seed) if arm == "ctrl" else subject.model
            r = fastpurify.anp(model, clean, device="cpu", channels_last=arm == "cl", seed=seed, **SETTINGS)
            at = evaluate(prune(model, r.masks, threshold=0.2), *held, subject.attack)
            rule = prune_by_clean_accuracy(model, r.masks, *clean, max_drop=0.0)
            after = evaluate(rule.model, *held, subject.attack)
            pruned = sum(int(v.sum()) for v in select_neurons(r.masks, threshold=0.2).values())
            print(seed, arm, f"{r.seconds:.0f}s pruned@0.2 {pruned} @0.2 ACC {at['acc']:.3f} ASR {at['asr']:.3f} | "
                  f"rule {rule.point.pruned} ACC {after['acc']:.3f} ASR {after['asr']:.3f}", flush=True)


ARMS = ("ref", "cl", "ctrl")

if __name__ == "__main__":
    try:
        seeds = [int(s) for s in sys.argv[1].split(",")]
        arms = sys.argv[2].split(",") if len(sys.argv) > 2 else list(ARMS)
        if not seeds or any(a not in ARMS for a in arms):
            raise ValueError
    except (IndexError, ValueError):
        sys.exit(f"usage: {sys.argv[0]} SEEDS [ARMS]  (SEEDS: comma-separated integers, e.g. 0,1,2; "
                 f"ARMS: comma-separated, from {','.join(ARMS)}; default all three)")
    main(seeds, arms)
