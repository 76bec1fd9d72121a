"""Clean controls: the subjects' model trained on the same split and recipe as reproduce's subjects
(fastpurify.reproduce.subjects.get_subject) without poison, saved as
CLEAN/clean-<ARCH>-<seed>.pt (paths and sizes as common.py). python clean_models.py 0[,1,...]"""
import os, sys, time, torch
from common import cifar
from fastpurify.backdoor import accuracy
from fastpurify.models import build_model
from fastpurify.training import train_classifier
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
cfg, split, _ = cifar()
arch, r = os.environ.get("ARCH", "small_cnn"), cfg.recipe
for seed in map(int, sys.argv[1].split(",")):
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, in_channels=3)
    start = time.time()
    train_classifier(model, *split.train, epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, weight_decay=r.weight_decay,
                     schedule=r.schedule, nesterov=r.nesterov, precision=r.precision,
                     label_smoothing=r.label_smoothing, channels_last=None, seed=seed, progress=False, device="cpu")
    path = os.path.join(os.environ.get("CLEAN", "."), f"clean-{arch}-{seed}.pt")
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    acc = accuracy(model, *split.test)  # every test image: the split keeps the archive's class order
    print(arch, "clean", seed, f"{time.time() - start:.0f} s, ACC {100 * acc:.1f} on {split.test[1].numel()} test images",
          flush=True)
