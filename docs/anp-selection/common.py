"""What the measurement scripts share: the subjects (CIFAR-10 CPU scale, cached; digits) and their mask sets.
Paths from the environment: CIFAR (the data source), SUBJECTS (the subject cache), MASKS, DIGITS; the CIFAR-10
subjects' model and training from ARCH (small_cnn; small_cnn_wide for the wider subjects), TRAIN_IMAGES (20000;
"all": the whole training split less the reserve) and EPOCHS (12); CLEAN, the folder of the clean controls."""
import os
import torch
from fastpurify.backdoor import BadNets, Blend
from fastpurify.data import load_digits, load_source, train_test_split
from fastpurify.ensemble import aggregate_masks
from fastpurify.models import small_cnn
from fastpurify.reproduce.config import paper_config
from fastpurify.reproduce.subjects import defender_clean, get_subject, split_data, subjects_folder

_CIFAR = {}


def cifar():
    """(config, split, cache) of the CPU-scale CIFAR-10 subjects, loaded once."""
    if not _CIFAR:
        images = os.environ.get("TRAIN_IMAGES", "20000")
        cfg = paper_config("anp", "cpu", arch=os.environ.get("ARCH", "small_cnn"), attacks=("badnets", "blend"),
                           seeds=3, rate=0.1, train_images=None if images == "all" else int(images),
                           epochs=int(os.environ.get("EPOCHS", "12")), clean_images=500)
        _CIFAR["v"] = (cfg, split_data(load_source(os.environ.get("CIFAR", "cifar10-jpeg"), progress=False), cfg),
                       subjects_folder(os.environ.get("SUBJECTS", "subjects")))
    return _CIFAR["v"]


def subject(name):
    """(model, attack, the defender's clean images, the test images) of "digits-<attack>-<seed>" or "<attack>-s<seed>"
    (attack "clean": a model trained without poison, clean_models.py; its attack None)."""
    if name.startswith("digits"):
        images, labels = load_digits(size=16)
        _, test = train_test_split(images, labels, 0.2, seed=0)
        model = small_cnn(num_classes=10, in_channels=1, width=32)
        model.load_state_dict(torch.load(os.path.join(os.environ.get("DIGITS", "."), f"{name}.pt")))
        attack = Blend(num_classes=10, target=0) if "blend" in name else BadNets(num_classes=10, target=0)
        return model.eval(), attack, (test[0][:100], test[1][:100]), (test[0][100:], test[1][100:])
    cfg, split, cache = cifar()
    attack, seed = name.split("-s")
    if attack == "clean":  # a model trained on the same split without poison: CLEAN/clean-<arch>-<seed>.pt
        from fastpurify.models import build_model
        arch = os.environ.get("ARCH", "small_cnn")
        model = build_model(arch, num_classes=10, in_channels=3)
        model.load_state_dict(torch.load(os.path.join(os.environ.get("CLEAN", "."), f"clean-{arch}-{seed}.pt")))
        return model.eval(), None, defender_clean(split, cfg), split.test
    s = get_subject(split, cfg, attack, int(seed), recipe=cfg.recipe, device=torch.device("cpu"), cache=cache,
                    progress=False)
    return s.model, s.attack, defender_clean(split, cfg), split.test


def mask_sets(name):
    """Each member's masks (m0..m3), their mean and their mean rank."""
    saved = torch.load(os.path.join(os.environ.get("MASKS", "masks"), f"{name}.pt"))
    sets = {f"m{k}": m for k, m in enumerate(saved["members"])}
    sets["mean"] = saved["mean"]
    sets["rank"] = aggregate_masks(saved["members"], "rank")
    return sets


def evaluation_subject(name):
    """(model frozen in eval mode, attack, the defender's clean images, the fixed random 2,000 test images, the
    model's ACC / ASR on them): what the order studies (rerank_study.py, greedy_study.py) start from."""
    from fastpurify.backdoor import evaluate
    model, attack, clean, test = subject(name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    idx = torch.randperm(test[1].numel(), generator=torch.Generator().manual_seed(0))[:2000]
    test = (test[0][idx], test[1][idx])
    return model, attack, clean, test, evaluate(model, *test, attack)


@torch.no_grad()
def recalibrated(net, images, passes=0, batch_size=500, padding=4, flip=True):
    """A copy of ``net`` whose BatchNorm statistics are re-estimated on ``images`` (the cumulative average of the batches'
    statistics, BatchNorms in training mode): ``passes`` passes with the training augmentation (crop after ``padding``
    pixels, ``flip``; generator seed 0), or with ``passes=0`` one pass of the images as they are (tenth round)."""
    import copy
    from fastpurify.data.sampler import augment_batch, make_generator
    net = copy.deepcopy(net)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.eval()
    for m in bns:
        m.train()
    g = make_generator(0)
    for batch in [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)] * max(passes, 1):
        net(augment_batch(batch, g, padding=padding, flip=flip) if passes else batch)
    return net.eval()
