"""Digits subjects for PBE: BadNets, Blend, SIG, WaNet at 10 %, seeds 0 and 1 (small_cnn width 32, 16 px)."""
import os, sys, time, torch
torch.set_num_threads(1)
from fastpurify.backdoor import BadNets, Blend, SIG, WaNet, train_backdoored
from fastpurify.data import load_digits, train_test_split
from fastpurify.models import small_cnn

ATTACKS = {"badnets": lambda: BadNets(num_classes=10, target=0), "blend": lambda: Blend(num_classes=10, target=0),
           "sig": lambda: SIG(num_classes=10, target=0, delta=60 / 255, frequency=2), "wanet": lambda: WaNet(num_classes=10, target=0)}


RATES = {"sig": 0.09}
EPOCHS = {"wanet": 40, "sig": 30}  # the warp and the clean-label signal need longer to implant on 16 px digits  # clean-label: 140 target-class images of 1,437; 10 % would need 144


def data():
    images, labels = load_digits(size=16)
    return train_test_split(images, labels, 0.2, seed=0)


def subject(name):
    """(model, attack, poisoned training set, test) of 'digits-<attack>-<seed>'."""
    from fastpurify.backdoor import poison
    _, attack, seed = name.split("-")
    train, test = data()
    att = ATTACKS[attack]()
    model = small_cnn(num_classes=10, in_channels=1, width=32)
    model.load_state_dict(torch.load(os.path.join(os.environ.get("DIGITS", "."), f"{name}.pt")))
    return model.eval(), att, poison(train, att, RATES.get(attack, 0.1), seed=int(seed)), test


if __name__ == "__main__":
    train, test = data()
    for attack in sys.argv[1].split(","):
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = small_cnn(num_classes=10, in_channels=1, width=32)
            t = time.time()
            s = train_backdoored(model, train, test, ATTACKS[attack](), RATES.get(attack, 0.1), seed=seed, epochs=EPOCHS.get(attack, 15), lr=0.05,
                                 batch_size=64, padding=2, flip=False, progress=False)
            torch.save(model.state_dict(), os.path.join(os.environ.get("DIGITS", "."), f"digits-{attack}-{seed}.pt"))
            print(attack, seed, s.metrics, round(time.time() - t, 1), flush=True)
