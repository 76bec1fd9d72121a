"""Two study variants of PBE's fine-tuning with a clean extra set (not in the package), run through
digits_run.py: python finetune_variants.py SETTING SUBJECTS 'JSON-kwargs' TAG, with

- VARIANT=mix: every adversarial batch holds its clean images and their PGD examples (made per
  batch against the current model), both with their labels; the clean epochs as the engine's;
- VARIANT=kd: the clean epochs' loss is (1 - KD) * cross-entropy + KD * KDT^2 * KL(infected model's
  softened logits || the model's), the infected model (a frozen copy taken before any update, eval
  mode) seeing the same augmented batch; the adversarial epochs as the engine's.

Each JSON line gets a "variant" field naming the variant and its settings."""
import copy, importlib, json, os, runpy, sys

import torch
import torch.nn.functional as F

P = importlib.import_module("fastpurify.engines.pbe")
VARIANT = os.environ["VARIANT"]
LAM, T = float(os.environ.get("KD", "0.5")), float(os.environ.get("KDT", "2"))
state = {"teacher": None, "phase": None}
engine_init, engine_purify = P.PBEEngine.__init__, P.PBEEngine.purify


def mixed_purify(self, images, labels, spec, bar=None, after_adversarial=None):
    cfg = self.plan.cfg
    clean = self._sampler(images, labels)
    for epoch in range(spec.epochs):
        for x, y in clean:
            if epoch < spec.adv_epochs:
                xa = self.attack.attack(x, y, random_start=cfg["random_start"], generator=self.generator,
                                        batch_size=x.shape[0], shard=True)
                x, y = torch.cat([x, xa]), torch.cat([y, y])
            self.tuner(x, y)
        if bar is not None:
            bar.update(1)
        if epoch == spec.adv_epochs - 1 and spec.clean_epochs and after_adversarial is not None:
            after_adversarial()


def kd_init(self, model, plan, **kw):
    engine_init(self, model, plan, **kw)
    state["teacher"] = copy.deepcopy(self.model).eval().requires_grad_(False)


def kd_purify(self, images, labels, spec, bar=None, after_adversarial=None):
    state["phase"] = "adversarial" if spec.adv_epochs else "clean"

    def after():
        state["phase"] = "clean"
        if after_adversarial is not None:
            after_adversarial()
    return engine_purify(self, images, labels, spec, bar=bar, after_adversarial=after)


def kd_step(self, x, y):
    logits = P.logits_in(self.model, x, self.device, self.precision)
    loss = F.cross_entropy(logits, y)
    if state["phase"] == "clean":
        with torch.no_grad():
            teacher = state["teacher"](x)
        kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(teacher / T, 1), reduction="batchmean") * T * T
        loss = (1 - LAM) * loss + LAM * kd
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()


if VARIANT == "mix":
    P.PBEEngine.purify = mixed_purify
elif VARIANT == "kd":
    P.PBEEngine.__init__, P.PBEEngine.purify, P.FineTuner._step = kd_init, kd_purify, kd_step
else:
    raise SystemExit(f"VARIANT must be mix or kd, got {VARIANT!r}")

out = os.path.join(os.environ.get("OUT", "."), f"digits-{sys.argv[1]}.jsonl")
before = os.path.getsize(out) if os.path.exists(out) else 0
sys.argv = ["digits_run.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_run.py"), run_name="__main__")
with open(out) as fh:  # name the variant in the lines this run appended
    fh.seek(before)
    new = [json.loads(line) for line in fh if line.strip()]
variant = {"name": VARIANT, **({"kd": LAM, "temperature": T} if VARIANT == "kd" else {})}
with open(out, "r+") as fh:
    fh.seek(before)
    fh.truncate()
    fh.writelines(json.dumps({**r, "variant": variant}) + "\n" for r in new)
