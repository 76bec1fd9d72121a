import pytest
import torch

from fastpurify import InputError
from fastpurify.masks import HEADER, format_masks, load_masks, parse_masks, save_masks

# The first lines of a mask_values.txt exactly as the official optimize_mask_cifar.py writes it
# ('{} \t {} \t {} \t {:.4f} \n'), for a ResNet-18 with a linear-layer BatchNorm1d at the end.
OFFICIAL = (
    "No \t Layer Name \t Neuron Idx \t Mask Score \n"
    "0 \t bn1 \t 0 \t 0.9021 \n"
    "1 \t bn1 \t 1 \t 0.0000 \n"
    "2 \t bn1 \t 2 \t 1.0000 \n"
    "3 \t layer1.0.bn1 \t 0 \t 0.4375 \n"
    "4 \t layer1.0.bn1 \t 1 \t 0.2000 \n"
    "5 \t fc_bn \t 0 \t 0.7500 \n"
)


def test_official_file_is_read():
    masks = parse_masks(OFFICIAL)
    assert list(masks) == ["bn1", "layer1.0.bn1", "fc_bn"]
    assert torch.equal(masks["bn1"], torch.tensor([0.9021, 0.0, 1.0]))
    assert torch.equal(masks["layer1.0.bn1"], torch.tensor([0.4375, 0.2]))
    assert masks["fc_bn"].dtype == torch.float32 and masks["fc_bn"].shape == (1,)


def test_written_text_is_the_official_format():
    masks = {"bn1": torch.tensor([0.9021, 0.0, 1.0]), "layer1.0.bn1": torch.tensor([0.4375, 0.2]),
             "fc_bn": torch.tensor([0.75])}
    assert format_masks(masks) == OFFICIAL


def test_round_trip_through_a_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = {"features.1": torch.rand(16, generator=g), "layer4.1.bn2": torch.rand(7, generator=g, dtype=torch.float64)}
    path = save_masks(masks, tmp_path / "out" / "mask_values.txt")
    assert path.read_text().startswith(HEADER)
    back = load_masks(path)
    assert list(back) == list(masks)
    for name in masks:  # four decimals, as the official format
        assert torch.allclose(back[name].double(), masks[name].double(), atol=5.01e-5, rtol=0)
    assert format_masks(back) == path.read_text()
    assert not list((tmp_path / "out").glob(".*tmp")), "atomic write leaves no temporary file"


def test_rows_in_any_order_are_placed_by_neuron_index():
    text = HEADER + "0 \t a \t 1 \t 0.5000 \n1 \t a \t 0 \t 0.2500 \n"
    assert torch.equal(parse_masks(text)["a"], torch.tensor([0.25, 0.5]))


@pytest.mark.parametrize("text, message", [
    ("", "does not start with the header"),
    ("0 \t a \t 0 \t 0.5 \n", "does not start with the header"),
    (HEADER, "holds no mask rows"),
    (HEADER + "0 \t a \t 0 \n", "expected 4 fields"),
    (HEADER + "0 \t a \t x \t 0.5 \n", "must be an integer"),
    (HEADER + "0 \t a \t 0 \t nan \n", "must be finite"),
    (HEADER + "0 \t a \t 0 \t 0.5 \n1 \t a \t 0 \t 0.5 \n", "appears twice"),
    (HEADER + "0 \t a \t 0 \t 0.5 \n1 \t a \t 2 \t 0.5 \n", "must be 0..1"),
])
def test_malformed_files_are_refused(text, message):
    with pytest.raises(InputError, match=message):
        parse_masks(text)


def test_missing_file_and_bad_masks(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_masks(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="non-empty dict"):
        format_masks({})
    with pytest.raises(InputError, match="1-D"):
        format_masks({"a": torch.ones(2, 2)})
    with pytest.raises(InputError, match="without spaces"):
        format_masks({"a b": torch.ones(2)})
