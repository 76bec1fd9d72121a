"""Does a patch reconstructed toward each class (the ANP auto rule's scan) tell, during PBE with a
clean extra set, whether the backdoor is still there? (A study, not in the package.)

python dose_probe.py digits|cifar SUBJECT 'JSON-kwargs' TAG   (one subject per call; the subjects,
data and output of digits_run.py / cifar_run.py, setting "clean")

The adversarial epochs are view_pgd.py's "view per epoch" (a fresh augmented view and fresh PGD
against the current model before each). AT=adv (default): probe the infected model and the model
after each adversarial epoch; AT=end: after the last epoch only; AT=all: both. A probe is the scan
(a patch of each AREAS share of the pixels, default 0.01, toward every class in turn: 100 Adam steps,
seed 0, on the extra set's images not of that class, eval mode; the share it sends there) and,
for evaluation only, ACC / ASR on the test set. Rows go to $OUT/dose-<dataset>.jsonl."""
import copy
import importlib
import json
import os
import runpy
import sys
import time

os.environ["VIEW"] = "epoch"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import view_pgd  # noqa: E402  (a study script beside this one)
from fastpurify.inference import predict
from fastpurify.patch_trigger import reconstruct_patch
from fastpurify.purification import measure

AREAS = [float(a) for a in os.environ.get("AREAS", "0.01").split(",")]
STEPS = 100
AT = os.environ.get("AT", "adv")  # adv: before and after each adversarial epoch; end: after the last epoch; all: both


def scan(model, images, labels, area):
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    shares = []
    for c in range(10):
        others = images[labels != c]
        mask, pattern = reconstruct_patch(net, others, c, area=area, steps=STEPS, batch_size=128, seed=0)
        shares.append(round(float((predict(net, (1 - mask) * others + mask * pattern, 256) == c).float().mean()), 4))
    return shares


def purify(self, images, labels, spec, bar=None, after_adversarial=None):
    """view_pgd.py's round, probed before it, after each adversarial epoch and after the last epoch (AT)."""
    cfg = self.plan.cfg

    def probe(epoch):
        t = time.time()
        row = dict(subject=SUBJECT, tag=TAG, seed=self.plan.seed, epoch=epoch, eps=cfg["eps"])
        for area in AREAS:
            row[f"scan{area:g}"] = scan(self.model, images, labels, area)
        was = self.model.training
        self.model.eval()
        row.update(measure(self.model, self.plan))
        self.model.train(was)
        row["probe_s"] = round(time.time() - t, 1)
        with open(os.path.join(os.environ.get("OUT", "."), f"dose-{DATASET}.jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(row, flush=True)

    def after_epoch(epoch):
        if epoch < spec.adv_epochs and AT != "end":
            probe(epoch + 1)
        if epoch == spec.epochs - 1 and AT in ("end", "all"):
            probe(f"end{spec.adv_epochs}")

    if AT != "end":
        probe(0)
    view_pgd.purify(self, images, labels, spec, bar, after_adversarial, after_epoch)


if __name__ == "__main__":
    importlib.import_module("fastpurify.engines.pbe").PBEEngine.purify = purify
    DATASET, SUBJECT, TAG = sys.argv[1], sys.argv[2], sys.argv[4]
    here = os.path.dirname(os.path.abspath(__file__))
    sys.argv = [f"{DATASET}_run.py", "clean"] + sys.argv[2:]
    runpy.run_path(os.path.join(here, f"{DATASET}_run.py"), run_name="__main__")
