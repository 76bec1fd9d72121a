"""PBE with its PGD examples made from the augmented view, the crop and flip drawn first (a study
variant, not in the package): python view_pgd.py digits|cifar SETTING SUBJECT[,SUBJECT] 'JSON-kwargs' TAG,
with VIEW=round (one view per round, PGD once) or VIEW=epoch (a fresh view and fresh PGD against
the current model before every adversarial epoch). The adversarial epochs then fine-tune on the
examples as made, unaugmented; the clean epochs are unchanged. Everything else is digits_run.py's
or cifar_run.py's (same subjects, same output files)."""
import importlib
import os
import runpy
import sys

from fastpurify.data.sampler import DeviceBatchSampler, augment_batch

MODE = os.environ.get("VIEW", "epoch")
if MODE not in ("round", "epoch"):
    raise SystemExit(f"VIEW must be 'round' or 'epoch', got {MODE!r}")


def purify(self, images, labels, spec, bar=None, after_adversarial=None, after_epoch=None):
    """PBEEngine.purify with the examples made from the augmented view (regenerate="round" only);
    ``after_epoch(epoch)``, when given, after every epoch (a study's hook: dose_probe.py)."""
    cfg = self.plan.cfg
    if cfg["regenerate"] != "round":
        raise SystemExit("view_pgd.py replaces the once-per-round examples: leave regenerate at 'round'")
    full = {cfg["batch_size"], self.pgd_batch_size}
    self.tuner.keep_batches(full)
    self.attack.keep_batches(full)

    def examples():
        view = augment_batch(images, self.generator, cfg["padding"], cfg["flip"]) if cfg["augment"] else images
        return self.attack.attack(view, labels, random_start=cfg["random_start"], generator=self.generator,
                                  batch_size=self.pgd_batch_size, shard=True)

    adversarial = examples() if spec.adv_epochs else None
    clean = self._sampler(images, labels)
    for epoch in range(spec.epochs):
        if epoch < spec.adv_epochs:
            if MODE == "epoch" and epoch > 0:
                adversarial = examples()
            batches = DeviceBatchSampler(adversarial, labels, cfg["batch_size"], generator=self.generator,
                                         augment=False)
        else:
            batches = clean
        for x, y in batches:
            self.tuner(x, y)
        if bar is not None:
            bar.update(1)
        if after_epoch is not None:
            after_epoch(epoch)
        if epoch == spec.adv_epochs - 1 and spec.clean_epochs and after_adversarial is not None:
            after_adversarial()


if __name__ == "__main__":
    importlib.import_module("fastpurify.engines.pbe").PBEEngine.purify = purify
    dataset = sys.argv[1]
    if dataset not in ("digits", "cifar"):
        raise SystemExit(f"the first argument is digits or cifar, got {dataset!r}")
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    sys.argv = [f"{dataset}_run.py"] + sys.argv[2:]
    runpy.run_path(os.path.join(here, f"{dataset}_run.py"), run_name="__main__")
