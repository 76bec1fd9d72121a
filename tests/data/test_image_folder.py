"""Image folders (torchvision's ImageFolder layout) from a folder or a tar archive: pixels, labels,
class order, the uint8 cache, every bad input, and the real CIFAR-10 (JPEG copy) where present."""

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastpurify.data.image_decode as image_decode
from fastpurify.data import ImageFolderData, load_image_folder, load_source
from fastpurify.validation import InputError

from .image_folders import encode, image_set, write_archive, write_folder

CIFAR10_JPEG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
CIFAR10_JPEG_SHA256 = "8a7486455913a144eff9778124c62aed0267866f43677e5de6c551a69b9fe512"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def expected(pixels, split, classes):
    """The images (N, C, H, W) and labels the loader must give: classes sorted, files by name."""
    rels = sorted((r for r in pixels if r.startswith(f"{split}/")), key=lambda r: (classes.index(r.split("/")[1]), r))
    images = np.stack([pixels[r] if pixels[r].ndim == 3 else pixels[r][..., None] for r in rels])
    labels = [classes.index(r.split("/")[1]) for r in rels]
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.tensor(labels)


@pytest.fixture
def counted_decodes(monkeypatch):
    """How many images were decoded (the decoder is wrapped; workers=0 decodes in this thread)."""
    calls = []
    real = image_decode.decode_image
    monkeypatch.setattr(image_decode, "decode_image", lambda payload: calls.append(1) or real(payload))
    return calls


@pytest.mark.parametrize("where", ["folder", "top folder", ".tar", ".tar.gz", ".tgz", ".tar.xz"])
def test_png_pixels_labels_and_class_order_are_exact(tmp_path, where):
    files, pixels = image_set()
    if where == "folder":
        source = write_folder(tmp_path / "set", files)
    elif where == "top folder":
        source = write_folder(tmp_path / "set", {f"my-set/{r}": d for r, d in files.items()})
    else:
        source = write_archive(tmp_path / f"set{where}", files, top="my-set" if where == ".tar.xz" else None)
    data = load_image_folder(source, cache=tmp_path / "cache", workers=2, progress=False)
    assert isinstance(data, ImageFolderData) and data.classes == ("ant", "cat", "dog") and data.num_classes == 3
    for split, (images, labels) in (("train", data.train), ("test", data.test)):
        want_images, want_labels = expected(pixels, split, list(data.classes))
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images.float() / 255)
    assert data.train[0].shape == (9, 3, 4, 5) and data.test[0].shape == (6, 3, 4, 5)
    raw = load_image_folder(source, cache=tmp_path / "cache", progress=False, dtype=torch.uint8)
    assert raw.train[0].dtype == torch.uint8
    assert torch.equal(raw.train[0], expected(pixels, "train", ["ant", "cat", "dog"])[0])


def test_jpeg_decodes_as_pillow_does(tmp_path):
    from PIL import Image

    files, _ = image_set(fmt="JPEG", size=(8, 8))
    data = load_image_folder(write_archive(tmp_path / "set.tar", files), cache=False, progress=False,
                             dtype=torch.uint8)
    first = np.array(Image.open(tmp_path / write_folder(tmp_path / "f", files) / "train/ant/001.jpg").convert("RGB"))
    assert torch.equal(data.train[0][0], torch.from_numpy(first).permute(2, 0, 1))


def test_grayscale_stays_one_channel_and_mixed_modes_become_rgb(tmp_path):
    files, pixels = image_set(channels=1)
    data = load_image_folder(write_folder(tmp_path / "grey", files), cache=False, progress=False, dtype=torch.uint8)
    assert data.train[0].shape == (9, 1, 4, 5)
    assert torch.equal(data.train[0], expected(pixels, "train", ["ant", "cat", "dog"])[0])
    rgb = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    files["train/ant/000.png"] = encode(rgb)  # one more image, sorting first: colour among grey ones
    mixed = load_image_folder(write_folder(tmp_path / "mixed", files), cache=False, progress=False,
                              dtype=torch.uint8)
    assert mixed.train[0].shape == (10, 3, 4, 5)
    assert torch.equal(mixed.train[0][0], torch.from_numpy(rgb).permute(2, 0, 1))
    grey = torch.from_numpy(pixels["train/ant/001.png"])
    assert all(torch.equal(mixed.train[0][1][c], grey) for c in range(3))  # a grey image in all three channels


def test_hidden_files_and_what_lies_beside_train_and_test_are_ignored(tmp_path):
    files, _ = image_set()
    extra = {".DS_Store": b"x", "README.txt": b"about", "val/x/1.png": files["train/ant/001.png"],
             "train/.DS_Store": b"x", "train/cat/._001.png": b"apple double", "test/.hidden/1.png": b"x"}
    data = load_image_folder(write_archive(tmp_path / "set.tar.gz", {**files, **extra}), cache=False, progress=False)
    assert data.classes == ("ant", "cat", "dog") and len(data.train[1]) == 9


def test_second_load_reads_the_cache_without_decoding(tmp_path, counted_decodes):
    files, _ = image_set()
    source = write_archive(tmp_path / "set.tar.xz", files, top="set")
    first = load_image_folder(source, cache=tmp_path / "cache", workers=0, progress=False)
    assert len(counted_decodes) == 15
    [cache_file] = (tmp_path / "cache").iterdir()
    assert cache_file.suffix == ".safetensors" and cache_file.name.startswith("set.tar.xz-")
    again = load_image_folder(source, cache=tmp_path / "cache", workers=0, progress=False)
    assert len(counted_decodes) == 15  # nothing decoded again
    assert again.classes == first.classes and torch.equal(again.train[0], first.train[0])
    assert torch.equal(again.test[1], first.test[1])
    load_image_folder(source, cache=False, workers=0, progress=False)
    assert len(counted_decodes) == 30


def test_cache_goes_to_fastpurify_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPURIFY_CACHE", str(tmp_path / "env-cache"))
    files, _ = image_set()
    load_image_folder(write_folder(tmp_path / "set", files), progress=False)
    assert len(list((tmp_path / "env-cache").glob("set-*.safetensors"))) == 1


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_a_changed_source_is_decoded_again(tmp_path, counted_decodes, kind):
    files, _ = image_set()
    cache = tmp_path / "cache"

    def write(files):
        if kind == "folder":
            return write_folder(tmp_path / "set", files)
        return write_archive(tmp_path / "set.tar", files)

    source = write(files)
    before = load_image_folder(source, cache=cache, workers=0, progress=False, dtype=torch.uint8)
    new = np.full((4, 5, 3), 7, dtype=np.uint8)
    files["train/ant/001.png"] = encode(new)
    write(files)
    stamp = time.time_ns() + 10**9
    os.utime(source / "train/ant/001.png" if kind == "folder" else source, ns=(stamp, stamp))
    after = load_image_folder(source, cache=cache, workers=0, progress=False, dtype=torch.uint8)
    assert len(counted_decodes) == 30 and len(list(cache.iterdir())) == 1  # decoded again, the one file replaced
    assert torch.equal(after.train[0][0], torch.from_numpy(new).permute(2, 0, 1))  # 001.png sorts first
    assert not torch.equal(after.train[0][0], before.train[0][0])


def test_a_corrupt_cache_file_is_rebuilt_with_a_warning(tmp_path, counted_decodes):
    files, _ = image_set()
    source = write_folder(tmp_path / "set", files)
    first = load_image_folder(source, cache=tmp_path / "cache", workers=0, progress=False)
    [cache_file] = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:200])
    with pytest.warns(RuntimeWarning, match="image cache .* is unreadable"):
        again = load_image_folder(source, cache=tmp_path / "cache", workers=0, progress=False)
    assert len(counted_decodes) == 30 and torch.equal(again.train[0], first.train[0])
    load_image_folder(source, cache=tmp_path / "cache", workers=0, progress=False)  # rewritten: no warning
    assert len(counted_decodes) == 30


def _bad(tmp_path, files, folders=(), archive=False, match=""):
    source = (write_archive(tmp_path / "bad.tar.gz", files, folders) if archive
              else write_folder(tmp_path / "bad", files, folders))
    with pytest.raises(InputError, match=match) as info:
        load_image_folder(source, cache=tmp_path / "cache", workers=2, progress=False)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing cached
    return str(info.value)


@pytest.mark.parametrize("archive", [False, True])
def test_a_corrupt_image_is_named(tmp_path, archive):
    files, _ = image_set()
    files["test/cat/001.png"] = files["test/cat/001.png"][:40]  # truncated
    message = _bad(tmp_path, files, archive=archive, match="is not a readable JPEG or PNG image")
    assert ("test/cat/001.png in " in message and "bad.tar.gz" in message) if archive else \
        str(tmp_path / "bad" / "test/cat/001.png") in message


def test_a_file_of_another_format_with_an_image_name_is_refused(tmp_path):
    from PIL import Image

    files, _ = image_set()
    import io
    buf = io.BytesIO()
    Image.new("RGB", (5, 4)).save(buf, "BMP")
    files["train/dog/001.png"] = buf.getvalue()
    _bad(tmp_path, files, match="train/dog/001.png is not a readable JPEG or PNG")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_image_is_named(tmp_path):
    files, _ = image_set()
    source = write_folder(tmp_path / "set", files)
    (source / "train/ant/002.png").chmod(0)
    with pytest.raises(InputError, match="train/ant/002.png is not a readable .*Permission denied"):
        load_image_folder(source, cache=False, progress=False)


@pytest.mark.parametrize("archive", [False, True])
def test_an_empty_class_folder_is_named(tmp_path, archive):
    files, _ = image_set()
    files = {r: d for r, d in files.items() if not r.startswith("test/cat/")}
    _bad(tmp_path, files, folders=["test/cat"], archive=archive, match=r"test/cat.* is empty: every class folder")


def test_train_and_test_must_hold_the_same_classes(tmp_path):
    files, _ = image_set()
    files = {r: d for r, d in files.items() if not r.startswith("test/cat/")}
    files["test/emu/001.png"] = files["test/ant/001.png"]
    message = _bad(tmp_path, files, match="must hold the same class folders")
    assert "only in train: cat" in message and "only in test: emu" in message


@pytest.mark.parametrize("archive", [False, True])
@pytest.mark.parametrize("layout, match", [
    ("flat", r"does not hold the expected layout train/<class>/<image> and test/<class>/<image>.*top holds: ant"),
    ("no test", r"expected layout .* top holds: train"),
    ("two tops", r"holds several image folders \(a, b\)"),
])
def test_a_source_without_the_layout_says_what_is_expected(tmp_path, archive, layout, match):
    files, _ = image_set()
    if layout == "flat":
        files = {r.split("/", 1)[1]: d for r, d in files.items() if r.startswith("train/")}
    elif layout == "no test":
        files = {r: d for r, d in files.items() if r.startswith("train/")}
    else:
        files = {f"{top}/{r}": d for r, d in files.items() for top in ("a", "b")}
    _bad(tmp_path, files, archive=archive, match=match)


@pytest.mark.parametrize("extra, match", [
    ({"train/ant/notes.txt": b"x"}, r"train/ant/notes.txt is not a .jpg, .jpeg or .png image"),
    ({"train/labels.csv": b"x"}, r"train/labels.csv lies directly in train/"),
    ({"test/ant/more/1.png": b"x"}, r"test/ant/more is a folder inside a class folder"),
])
def test_unexpected_entries_inside_train_and_test_are_named(tmp_path, extra, match):
    files, _ = image_set()
    _bad(tmp_path, {**files, **extra}, match=match)


def test_images_of_another_size_are_named(tmp_path):
    files, _ = image_set()
    files["test/dog/002.png"] = encode(np.zeros((6, 5, 3), dtype=np.uint8))
    _bad(tmp_path, files, match=r"test/dog/002.png is 5x6 pixels but .*train/ant/001.png is 5x4")


def test_sources_that_are_not_image_folders(tmp_path):
    (tmp_path / "junk.tar.xz").write_bytes(b"not xz at all")
    with pytest.raises(InputError, match="junk.tar.xz is not a readable tar archive"):
        load_image_folder(tmp_path / "junk.tar.xz", cache=False)
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(InputError, match="neither a folder nor a tar archive"):
        load_image_folder(tmp_path / "images.zip", cache=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "missing", cache=False)
    with pytest.raises(InputError, match="workers"):
        load_image_folder(tmp_path, workers=-1)


def test_imagefolder_and_cifar10_jpeg_sources(tmp_path, monkeypatch):
    files, _ = image_set(size=(8, 8))
    source = write_archive(tmp_path / "set.tar", files)
    splits = load_source(f"imagefolder:{source}", progress=False)
    assert splits.name == "set.tar" and splits.num_classes == 3 and splits.channels == 3
    assert len(splits.train[1]) == 9 and len(splits.test[1]) == 6
    assert load_source(f"imagefolder:{source}", size=8, channels=3).num_classes == 3
    with pytest.raises(InputError, match="not the 1 channels of 16 pixels"):
        load_source(f"imagefolder:{source}", size=16, channels=1)
    with pytest.raises(InputError, match="is not the CIFAR-10 \\(JPEG copy\\)"):
        load_source(f"cifar10-jpeg:{source}")
    with pytest.raises(InputError, match="3x32x32"):
        load_source("cifar10-jpeg", size=16)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTPURIFY_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as info:
        load_source("cifar10-jpeg")
    for place in (tmp_path / "elsewhere", tmp_path / "data", tmp_path.parent / "shared" / "data"):
        assert str(place / "cifar10-jpeg.tar.xz") in str(info.value)


def test_cifar10_jpeg_is_found_and_named(tmp_path, monkeypatch):
    """The alias finds the tarball in ./data and names it; a fake with CIFAR-10's classes stands in."""
    rng = np.random.default_rng(0)
    files = {f"{s}/{c}/0.jpg": encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG")
             for s in ("train", "test") for c in CIFAR10_CLASSES}
    (tmp_path / "data").mkdir()
    write_archive(tmp_path / "data" / "cifar10-jpeg.tar.xz", files, top="cifar10-jpeg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTPURIFY_DATA", raising=False)
    splits = load_source("cifar10-jpeg")
    assert splits.name == "CIFAR-10 (JPEG copy)" and splits.num_classes == 10
    assert splits.train[0].shape == (10, 3, 32, 32) and splits.train[1].tolist() == list(range(10))


@pytest.mark.skipif(not CIFAR10_JPEG.is_file(), reason=f"the CIFAR-10 (JPEG copy) tarball is not at {CIFAR10_JPEG} "
                    "(the repository's ../shared/data/cifar10-jpeg.tar.xz)")
def test_the_real_cifar10_jpeg_tarball(tmp_path):
    """All 60,000 images: decoded once (timed), then read back from the cache."""
    digest = hashlib.sha256(CIFAR10_JPEG.read_bytes()).hexdigest()
    assert digest == CIFAR10_JPEG_SHA256
    start = time.perf_counter()
    data = load_image_folder(CIFAR10_JPEG, cache=tmp_path, progress=False, dtype=torch.uint8)
    decoded = time.perf_counter() - start
    assert data.classes == CIFAR10_CLASSES
    assert data.train[0].shape == (50000, 3, 32, 32) and data.test[0].shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train[1]).tolist() == [5000] * 10
    assert torch.bincount(data.test[1]).tolist() == [1000] * 10
    start = time.perf_counter()
    cached = load_image_folder(CIFAR10_JPEG, cache=tmp_path, progress=False, dtype=torch.uint8)
    read = time.perf_counter() - start
    assert torch.equal(cached.train[0], data.train[0]) and torch.equal(cached.test[1], data.test[1])
    assert read < decoded
    print(f"CIFAR-10 (JPEG copy): decoded in {decoded:.1f} s, read from the cache in {read:.2f} s")
