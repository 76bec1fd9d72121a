"""ANP on timm's classifiers: the fast engine equals the reference (float64, same draws) on one
model of each norm kind that timm brings -- norm-act layers, timm's LayerNorm, GroupNorm, and the
generic path for norm subclasses with their own forward -- and masks every norm layer, the
classifier's own included."""

import pytest
import torch

import fastpurify
from fastpurify._torchvision import import_torchvision
from fastpurify.neurons import layer_kind
from fastpurify.reference import anp as reference_anp

from .test_anp import clean_set, max_gap

NORM_KINDS = ("batchnorm", "layernorm", "groupnorm")


def timm_model(name, **kw):
    import_torchvision()  # timm imports torchvision, whose compiled ops may not load beside a CPU torch
    timm = pytest.importorskip("timm", reason="timm is a test dependency (pyproject's [test] extra)")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def norm_layers(model):
    return [name for name, m in model.named_modules() if layer_kind(m) in NORM_KINDS]


# (model, constructor keywords, the path that the model's norms exercise)
MODELS = [
    ("mobilenetv3_small_050", {}, {"fused": 34}),                      # BatchNormAct2d (+ plain BatchNorm2d)
    ("vit_tiny_patch16_224", {"img_size": 32}, {"fused": 25}),         # timm's LayerNorm, the head's norm included
    ("poolformer_s12", {}, {"fused": 25}),                             # GroupNorm1, the head's LayerNorm2d
    ("poolformerv2_s12", {}, {"generic": 28, "fused": 1}),             # metaformer's own *NoBias norms
]


@pytest.mark.parametrize("name, kw, paths", MODELS, ids=[m[0] for m in MODELS])
def test_fast_engine_equals_the_reference_on_timm_models(name, kw, paths):
    model = timm_model(name, **kw).double()
    data = clean_set(16, size=32)
    settings = dict(iterations=3, batch_size=8, progress=False, seed=3)
    ref = reference_anp(model, data, **settings)
    fast = fastpurify.anp(model, data, device="cpu", **settings)
    assert fast.engine["layer_paths"] == paths
    assert list(fast.masks) == norm_layers(model)  # every norm layer, in model order
    assert max_gap(ref.masks, fast.masks) < 1e-6
    assert max_gap(ref.masks, {k: torch.ones_like(v) for k, v in ref.masks.items()}) > 1e-4  # the masks moved


@pytest.mark.parametrize("name, kw, head_norm", [
    ("efficientnet_b0", {}, "bn2"),
    ("vit_tiny_patch16_224", {"img_size": 32}, "norm"),
    ("poolformer_s12", {}, "head.norm"),
])
def test_anp_masks_every_norm_layer_of_timm_models(name, kw, head_norm):
    model = timm_model(name, **kw)
    result = fastpurify.anp(model, clean_set(8, size=32, dtype=torch.float32), iterations=2, batch_size=4,
                            progress=False, device="cpu")
    layers = norm_layers(model)
    assert list(result.masks) == layers and head_norm in layers
    assert result.num_neurons == sum(model.get_submodule(n).weight.numel() for n in layers)
    assert all(torch.isfinite(m).all() for m in result.masks.values())
