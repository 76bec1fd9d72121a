"""Stage ``cifar``: the real-data run, CIFAR-10 (JPEG copy) — ``fastpurify reproduce anp`` and
``reproduce pbe`` sized to the stage's share of the budget.

It needs the tarball inside the checkout (``--cifar PATH``; only the checkout travels to a GPU
machine). One backdoored CIFAR ResNet-18 per attack (poison rate 10 %) serves both defenses, its
training capped by the budget (``reproduce --budget``); ANP runs the paper's 2,000 iterations when
the stage has the time (else 500), PBE the clean-extra-set setting (and the setting without clean
data when the stage has several minutes). The papers' full tables, with their own architectures
and seeds, are a separate ``fastpurify reproduce`` run. A dry run does the same at smoke sizes on
the CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

def unavailable(cifar: str | None) -> str | None:
    """Why the stage cannot run, or None."""
    if not cifar:
        return "no --cifar tarball given (copy ../shared/data/cifar10-jpeg.tar.xz into an ignored folder of the " \
               "checkout and pass --cifar PATH)"
    if not Path(cifar).is_file():
        return f"--cifar {cifar}: no such file"
    return None


def plan(seconds: float, dry_run: bool) -> tuple[dict, dict, dict]:
    """(shared, anp-only, pbe-only) keywords of :func:`fastpurify.reproduce.reproduce` for a stage
    of ``seconds``: the backdoored subjects' training gets about a third of it. ANP also runs on
    a clean control (attack ``"none"``: the same training without poison), given the same
    training time per subject, so the table shows what each pruning rule does where there is no
    backdoor (the trigger-free rule should prune nothing)."""
    from ..reproduce.config import CONTROL  # torch is imported by the stage, not by the plan's checks

    if dry_run:
        shared = dict(arch="small_cnn", rate=0.1, train_images=600, test_images=300, clean_images=40, epochs=1,
                      budget=None, device="cpu")
        # the plumbing only: the auto rule's trigger reconstructions (100 steps per candidate) do not fit on a CPU
        return shared, dict(attacks=("badnets", CONTROL), anp_iterations=5, auto_rule=False), dict(
            attacks=("badnets",), pbe_adv_epochs=1, pbe_clean_epochs=1, pbe_settings=("clean",))
    attacks = ("badnets", "blend") if seconds >= 240 else ("badnets",)
    per_subject = max(10.0, 0.35 * seconds) / len(attacks)
    shared = dict(arch="cifar_resnet18", rate=0.1)
    anp_attacks = attacks + ((CONTROL,) if seconds >= 240 else ())
    anp = dict(attacks=anp_attacks, budget=per_subject * len(anp_attacks),
               anp_iterations=2000 if seconds >= 150 else 500)
    pbe = dict(attacks=attacks, budget=per_subject * len(attacks),
               pbe_settings=("clean", "no-clean") if seconds >= 400 else ("clean",))
    return shared, anp, pbe


def run(record, opts) -> None:
    why = unavailable(opts.cifar)
    if why:
        record.finish("skipped", why)
        return
    from ..reproduce import reproduce

    shared, anp, pbe = plan(record.left(), opts.dry_run)
    out = record.path.parent / "cifar"
    cache = Path(tempfile.mkdtemp(prefix="fastpurify-gpucheck-subjects-"))  # a bare machine: nothing to reuse
    record.put(plan={"shared": shared, "anp": anp, "pbe": pbe})
    tables = []
    for defense, own, need in (("anp", anp, 0.0), ("pbe", pbe, 10.0)):
        def step(defense=defense, own=own):
            return reproduce(defense, f"cifar10-jpeg:{opts.cifar}", out=out / defense, subject_cache=cache,
                             progress=False, **shared, **own)
        table = record.run_step(f"reproduce {defense}", step, need=need)
        if table is not None:
            record.put(**{defense: {"rows": table["rows"], "runs": table["runs"], "config": table["config"],
                                    "device": table["device"], "seconds": table["seconds"]}})
            tables.append((out / defense / "table.md").read_text())
            record.put(table="\n".join(tables))
