import os
import pickle

import pytest
import torch

from fastpurify.checkpoint import load_model, load_state_dict, read_metadata, save_model
from fastpurify.models import small_cnn
from fastpurify.validation import InputError


def trained_like(seed=0):
    torch.manual_seed(seed)
    model = small_cnn(num_classes=4, in_channels=1, width=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_()
    return model


def test_safetensors_round_trip_with_metadata(tmp_path):
    model = trained_like()
    path = save_model(model, tmp_path / "out" / "m.safetensors",
                      metadata={"arch": "small_cnn", "num_classes": 4, "in_channels": 1})
    assert read_metadata(path)["num_classes"] == 4
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp file left
    state = load_state_dict(path)
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)


def test_load_model_builds_from_metadata(tmp_path):
    model = small_cnn(num_classes=3, in_channels=2)
    path = save_model(model, tmp_path / "m.safetensors", metadata={"arch": "small_cnn", "num_classes": 3,
                                                                    "in_channels": 2})
    loaded, meta = load_model(path)
    assert meta["arch"] == "small_cnn" and loaded(torch.rand(1, 2, 8, 8)).shape == (1, 3)
    with pytest.raises(InputError, match="does not fit"):
        load_model(path, num_classes=5)


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s}, lambda s: {"model": s, "epoch": 3},
                                  lambda s: {"module." + k: v for k, v in s.items()}])
def test_plain_torch_checkpoints_are_unwrapped(tmp_path, wrap):
    state = trained_like().state_dict()
    torch.save(wrap(state), tmp_path / "m.pth")
    loaded = load_state_dict(tmp_path / "m.pth")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch should_not_exist",))


def test_pickled_code_is_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as fh:
        pickle.dump({"state_dict": Payload()}, fh)
    with pytest.raises(InputError, match="trust_pickle"):
        load_state_dict("evil.pt")
    assert not (tmp_path / "should_not_exist").exists()


def test_missing_checkpoint():
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict("/nonexistent/model.safetensors")


def test_unknown_architecture(tmp_path):
    torch.save(trained_like().state_dict(), tmp_path / "m.pt")
    with pytest.raises(InputError, match="--arch"):
        load_model(tmp_path / "m.pt")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b[:100], lambda b: b"\x00" * len(b),
                                    lambda b: b""])
def test_a_damaged_checkpoint_is_named(tmp_path, suffix, damage):
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_model(trained_like(), path, metadata={"arch": "small_cnn", "num_classes": 4, "in_channels": 1})
    else:
        torch.save(trained_like().state_dict(), path)
    path.write_bytes(damage(path.read_bytes()))
    for trust_pickle in (False, True):
        with pytest.raises(InputError, match=f"{path} is not a readable checkpoint"):
            load_model(path, "small_cnn", 4, 1, trust_pickle=trust_pickle)
