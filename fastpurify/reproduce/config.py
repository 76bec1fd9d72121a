"""The settings of a reproduction run: the papers' defaults per defense, the subject-training
recipe per device, and the checks every setting goes through before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..backdoor import ATTACKS
from ..purification import DEFAULT_SCHEDULE, INITIAL, RECIPES, default_exclude_low_loss
from ..validation import (InputError, check_anp_eps, check_auto_or_fraction, check_fraction, check_hold,
                          check_positive, check_positive_int)

DEFENSES = ("anp", "pbe")
PBE_SETTINGS = ("clean", "no-clean")
SELECT_ORDERS = ("masks", "patch")  # the auto rule's ranking (fastpurify.selection.ORDERS)
CONTROL = "none"  # the clean control: a subject trained on the same split without poison (no ASR)


@dataclass(frozen=True)
class TrainRecipe:
    """How a subject is trained (:func:`fastpurify.training.train_classifier`)."""

    epochs: int
    batch_size: int
    lr: float
    schedule: str
    nesterov: bool
    precision: str
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0


def default_recipe(device_type: str) -> TrainRecipe:
    """The GPU recipe: batch 512, one-cycle to lr 0.2 (Nesterov), bf16 autocast, channels_last
    (on CUDA), 30 epochs. The CPU recipe: batch 128, cosine from 0.05, fp32, 15 epochs."""
    if device_type == "cuda":
        return TrainRecipe(epochs=30, batch_size=512, lr=0.2, schedule="onecycle", nesterov=True, precision="bf16")
    return TrainRecipe(epochs=15, batch_size=128, lr=0.05, schedule="cosine", nesterov=False, precision="fp32")


@dataclass(frozen=True)
class ReproduceConfig:
    """One reproduction: which defense, on which subjects, with which settings.

    Subjects: ``arch`` trained on the training split less a ``reserve_fraction`` held out for the
    defender (optionally first cut to a random ``train_images``), poisoned by each attack at
    ``rate`` (target ``target``, all-to-one), one per seed; the attack ``"none"`` is the clean
    control, trained the same way without poison (no ASR: what each defense costs, and whether
    the trigger-free rule prunes, where there is no backdoor). The defender's clean images are
    ``clean_images`` of the reserve (default ``clean_fraction`` of the training split). ACC and
    ASR are measured on the test split (optionally a random ``test_images`` of it).
    """

    defense: str
    attacks: tuple[str, ...] = ("badnets", "blend")
    seeds: int = 1
    arch: str = "cifar_resnet18"
    rate: float = 0.05
    target: int = 0
    reserve_fraction: float = 0.1
    clean_fraction: float = 0.01
    clean_images: int | None = None
    train_images: int | None = None
    test_images: int | None = None
    recipe: TrainRecipe = field(default_factory=lambda: default_recipe("cpu"))
    # ANP (the paper's settings) and its two pruning rules
    anp_iterations: int = 2000
    anp_batch_size: int = 128
    anp_eps: float | str = 0.4  # the neuron perturbation's bound: the paper's, or "auto" (fastpurify.anp_eps)
    threshold: float = 0.2
    max_drop: float = 0.02
    anp_seeds: int = 1  # > 1: a seed ensemble, pruned by its mean mask
    auto_rule: bool = True  # also prune by the trigger-free auto rule (fastpurify.selection)
    select_order: str = "masks"  # the auto rule's ranking: ANP's masks, or "patch" (fastpurify.patch_order)
    select_order_area: float | str | None = None  # the order's patch: None the probe's 1 %, a share, or "auto"
    select_correct_stats: bool = False  # the auto rule corrects BatchNorm statistics for its pruning (bn_statistics)
    select_hold: int = 0  # the auto rule's stop must hold over this many more candidates (selection.choose_pruning)
    # PBE (the engine's defaults are the paper's)
    pbe_settings: tuple[str, ...] = PBE_SETTINGS
    pbe_adv_epochs: int | None = None  # None (both): fastpurify.pbe's rounds for the setting
    pbe_clean_epochs: int | None = None
    pbe_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    pbe_eps: float = 6 / 255
    pbe_lr: float | None = None  # None: fastpurify.pbe's default for the setting
    pbe_recipe: str | None = None  # "authors": their scripts' rounds (replaces the epochs)
    pbe_initial: str = "random"  # the no-clean round 0: "random" (the paper) or "high-loss"
    pbe_exclude_low_loss: float | None = None  # no-clean: the best-fitted share kept out (None: pbe's default)

    def as_dict(self) -> dict:
        return asdict(self)


def paper_config(defense: str, device_type: str = "cpu", **overrides) -> ReproduceConfig:
    """The paper's setting for ``defense`` (papers.SETTINGS), with ``overrides`` applied and checked.

    ANP: CIFAR ResNet-18, poison rate 5 % (the authors' code), 1 % of the training set (500 of
    CIFAR-10's 50,000) as the defender's clean images. PBE: PreAct-ResNet-18, rate 10 %, a 5 %
    clean extra set, and the setting without clean data.

    Overrides named like :class:`TrainRecipe` fields (``epochs``, ``batch_size``, ``lr``, ...)
    change the device's training recipe; the others are :class:`ReproduceConfig` fields.
    """
    if defense not in DEFENSES:
        raise InputError(f"unknown defense {defense!r}: choose one of {DEFENSES}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    recipe_keys = set(TrainRecipe.__dataclass_fields__)
    config_keys = set(ReproduceConfig.__dataclass_fields__) - {"defense", "recipe"}
    unknown = set(overrides) - recipe_keys - config_keys
    if unknown:
        raise InputError(f"unknown reproduction setting(s) {', '.join(sorted(unknown))}: use "
                         f"{', '.join(sorted(recipe_keys | config_keys))}")
    recipe = replace(default_recipe(device_type), **{k: v for k, v in overrides.items() if k in recipe_keys})
    base = ReproduceConfig(defense=defense, recipe=recipe)
    if defense == "pbe":
        base = replace(base, arch="preact_resnet18", rate=0.1, clean_fraction=0.05)
    config = replace(base, **{k: v for k, v in overrides.items() if k in config_keys})
    check_config(config)
    return config


def check_config(c: ReproduceConfig) -> None:
    """Every setting in range, with an error that says what is accepted."""
    if not c.attacks:
        raise InputError("give at least one attack (--attacks badnets,blend,sig,wanet)")
    for a in c.attacks:
        if a not in ATTACKS and a != CONTROL:
            raise InputError(f"unknown attack {a!r}: choose from {', '.join(ATTACKS)}, or {CONTROL} (a clean "
                             "control: the same training without poison)")
    if len(set(c.attacks)) != len(c.attacks):
        raise InputError(f"--attacks lists an attack twice: {','.join(c.attacks)}")
    check_positive_int(c.seeds, "--seeds")
    check_positive_int(c.anp_seeds, "--anp-seeds")
    check_fraction(c.rate, "--rate")
    check_fraction(c.reserve_fraction, "the reserve fraction")
    check_fraction(c.clean_fraction, "the clean fraction")
    for name in ("clean_images", "train_images", "test_images"):
        if getattr(c, name) is not None:
            check_positive_int(getattr(c, name), f"--{name.replace('_', '-')}")
    check_positive_int(c.recipe.epochs, "--epochs")
    check_positive_int(c.recipe.batch_size, "--batch-size")
    check_positive(c.recipe.lr, "--lr")
    check_positive_int(c.anp_iterations, "--iterations")
    check_positive_int(c.anp_batch_size, "--anp-batch-size")
    check_anp_eps(c.anp_eps, "--anp-eps")
    if c.select_order not in SELECT_ORDERS:
        raise InputError(f"--select-order must be one of {', '.join(SELECT_ORDERS)}, got {c.select_order!r}")
    if c.select_order_area is not None:
        if c.select_order != "patch":
            raise InputError("--select-order-area is the patch of --select-order patch; give that too")
        check_auto_or_fraction(c.select_order_area, "--select-order-area", "a share of the pixels")
    if c.select_correct_stats and not c.auto_rule:
        raise InputError("--select-correct-stats corrects the auto rule's pruning; drop --no-auto-rule")
    check_hold(c.select_hold, "--select-hold")
    if c.select_hold and not c.auto_rule:
        raise InputError("--select-hold is how the auto rule's walk stops; drop --no-auto-rule")
    check_fraction(c.threshold, "--threshold", low_open=False)
    check_fraction(c.max_drop, "--max-drop", low_open=False, high_open=False)
    if not c.pbe_settings or any(s not in PBE_SETTINGS for s in c.pbe_settings):
        raise InputError(f"--pbe-settings must list some of {', '.join(PBE_SETTINGS)}, got {','.join(c.pbe_settings)}")
    if (c.pbe_adv_epochs is None) != (c.pbe_clean_epochs is None):
        raise InputError("give both PBE epoch counts (--pbe-epochs ADV,CLEAN) or neither")
    if c.pbe_recipe is not None and c.pbe_adv_epochs is not None:
        raise InputError("--pbe-recipe sets the rounds' epochs: do not also give --pbe-epochs")
    if c.pbe_adv_epochs is not None and (c.pbe_adv_epochs < 0 or c.pbe_clean_epochs < 0
                                         or c.pbe_adv_epochs + c.pbe_clean_epochs == 0):
        raise InputError(f"--pbe-epochs ADV,CLEAN must be two counts >= 0, not both 0; got "
                         f"{c.pbe_adv_epochs},{c.pbe_clean_epochs}")
    if not c.pbe_schedule or any(not 0 < f <= 1 for f in c.pbe_schedule):
        raise InputError(f"--pbe-schedule must be fractions in (0, 1], got {c.pbe_schedule}")
    check_positive(c.pbe_eps, "--pbe-eps")
    if c.pbe_lr is not None:
        check_positive(c.pbe_lr, "--pbe-lr")
    if c.pbe_recipe is not None and c.pbe_recipe not in RECIPES:
        raise InputError(f"--pbe-recipe must be one of {', '.join(sorted(RECIPES))} or not given, got {c.pbe_recipe!r}")
    if c.pbe_initial not in INITIAL:
        raise InputError(f"--pbe-initial must be 'random' or 'high-loss', got {c.pbe_initial!r}")
    if c.pbe_exclude_low_loss is not None:
        check_fraction(c.pbe_exclude_low_loss, "--pbe-exclude-low-loss", low_open=False)
    share = c.pbe_exclude_low_loss
    if share is None:
        share = default_exclude_low_loss(True, c.pbe_initial)
    if "no-clean" in c.pbe_settings and share and max(c.pbe_schedule) > 1 - share:
        which = "" if c.pbe_exclude_low_loss is not None else f" (--pbe-initial {c.pbe_initial}'s default)"
        raise InputError(f"--pbe-exclude-low-loss {share}{which} leaves {1 - share:.0%} of the training images, but "
                         f"--pbe-schedule's last round takes {max(c.pbe_schedule):.0%}")
