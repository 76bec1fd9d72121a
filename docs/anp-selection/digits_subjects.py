import os, sys, torch, time
from fastpurify.backdoor import BadNets, Blend, evaluate, train_backdoored
from fastpurify.data import load_digits, train_test_split
from fastpurify.models import small_cnn
from fastpurify.training import train_classifier
from fastpurify.checkpoint import save_model
torch.set_num_threads(1)
images, labels = load_digits(size=16)
train, test = train_test_split(images, labels, 0.2, seed=0)
for name in ["badnets", "blend", "clean"]:
    for seed in [0, 1]:
        torch.manual_seed(seed)
        model = small_cnn(num_classes=10, in_channels=1, width=32)
        kw = dict(epochs=15, lr=0.05, batch_size=64, padding=2, flip=False, progress=False, seed=seed)
        t = time.time()
        if name == "clean":
            train_classifier(model, *train, **kw)
        else:
            attack = BadNets(num_classes=10, target=0) if name == "badnets" else Blend(num_classes=10, target=0)
            train_backdoored(model, train, test, attack, 0.1, **kw)
        torch.save(model.state_dict(), os.path.join(os.environ.get("DIGITS", "."), f"digits-{name}-{seed}.pt"))
        print(name, seed, round(time.time() - t, 1), flush=True)
