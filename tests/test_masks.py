import json

import pytest
import torch

from fastpurify import InputError
from fastpurify.masks import HEADER, ANPResult, format_masks, load_masks, parse_masks, save_masks

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


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_json_and_csv_round_trip_at_full_precision(tmp_path, suffix):
    masks = {"layer1.0.bn1": torch.tensor([0.123456789, 1.0, 0.0]), "bn": torch.tensor([0.5])}
    path = save_masks(masks, tmp_path / f"masks{suffix}", settings={"eps": 0.4})
    back = load_masks(path)
    assert list(back) == list(masks)
    assert all(torch.equal(back[k], masks[k]) for k in masks)
    if suffix == ".json":
        assert json.loads(path.read_text())["settings"] == {"eps": 0.4}
    else:
        assert path.read_text().splitlines()[:2] == ["no,layer,neuron,mask", "0,layer1.0.bn1,0,0.12345679104328156"]


def test_result_save_picks_the_format_by_suffix(tmp_path):
    result = ANPResult({"bn": torch.tensor([0.25, 0.75])}, settings={"seed": 3})
    assert result.save(tmp_path / "m.txt").read_text().startswith("No \t Layer Name")
    assert json.loads(result.save(tmp_path / "m.json").read_text())["layers"] == {"bn": [0.25, 0.75]}
    assert result.save(tmp_path / "m.csv").read_text().startswith("no,layer,neuron,mask\n")


@pytest.mark.parametrize("suffix, text, message", [
    (".json", '{"masks": []}', "not a fastpurify mask JSON"),
    (".csv", "a,b\n", "header no,layer,neuron,mask"),
    (".csv", "no,layer,neuron,mask\n0,bn,1,0.5\n", "must be 0..0"),
])
def test_bad_json_and_csv_are_refused(tmp_path, suffix, text, message):
    path = tmp_path / f"m{suffix}"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_masks(path)
