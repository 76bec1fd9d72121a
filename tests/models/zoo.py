"""The models of the exactness matrix (tests/models/test_exactness_matrix.py): every torchvision
classifier and a spread of timm architectures (the smallest variant of each family), each with
about the cheapest input it accepts.

A :class:`Spec` names a model as :func:`fastpurify.models.build_model` does (``torchvision:<name>``
or ``timm:<name>``), the constructor arguments it needs for a small input (ViTs build their
position embeddings for ``image_size`` / ``img_size``) and that input's side. Every model is built
freshly initialised (``weights=None`` / ``pretrained=False``: nothing is downloaded), 10 classes.

Sizes: 32 px for most (a stride-32 network's last stage is then 1x1: in a batch of 2, its
train-mode BatchNorms still see 2 values a channel); AlexNet's stem needs 63 px, Inception v3's
75 px; ViTs are told their input (4 patches); timm's ConvMixer takes 14 px (2x2 patches).

Reductions. At full size the torchvision zoo is ~5.5 billion parameters: building, copying
(``convert`` copies the model) and casting them to float64 costs ~3.5 s per 100M parameters on a
2-core machine, several minutes in all; and MaxViT's partition size 7 needs a 224 px input. The
specs with ``reduced`` set build the model through torchvision's own builder with fewer repeats
of a block (one block per stage; 2 encoder layers of a ViT; the 2 blocks, regular and
shifted-window, of every Swin stage), everything else the builder's: the same block classes, the
same widths, heads, groups, SE ratios and norm settings. The check is per layer (each converted
layer must compute what the original computes, in its place in the network): every kind of block,
and every place a norm sits in one, is still checked. Two cut more and say so: regnet_y_128gf
also quarters its widths (its one last-stage block alone is ~115M parameters), VGG's classifier
(no norm layer, 103M of its parameters in one Linear) has hidden layers 64 wide. Inception v3
leaves out its auxiliary classifier (a BasicConv2d branch that needs a 299 px input).
``test_reductions_keep_every_kind_of_layer`` checks each reduced model against the full model,
both built on the meta device: the same module classes, the same norm classes and settings.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from unittest import mock

import torch
import torch.nn as nn

from fastpurify._torchvision import import_torchvision
from fastpurify.models import build_model

NUM_CLASSES = 10
BATCH = 2


@dataclass(frozen=True)
class Spec:
    model: str                       # "torchvision:<name>" or "timm:<name>"
    size: int                        # the input's height and width
    kwargs: dict = field(default_factory=dict)
    build: Callable[[], nn.Module] | None = None  # a reduced constructor (see ``reduced``)
    reduced: str = ""                # what a reduced spec cuts, and why that is safe
    leaves_out: tuple[str, ...] = ()  # module classes of the full model a reduced spec does not hold

    @property
    def name(self) -> str:
        return self.model.partition(":")[2]

    def construct(self) -> nn.Module:
        if self.build is not None:
            return self.build()
        return build_model(self.model, num_classes=NUM_CLASSES, **self.kwargs)


# --- torchvision --------------------------------------------------------------------------------
# Every classifier torchvision.models.list_models(module=torchvision.models) lists (torchvision 0.28):
# the matrix test fails when torchvision lists one that is not here, or this lists one it does not.
TORCHVISION_NAMES: tuple[str, ...] = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75",
    "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf",
    "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf",
    "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t",
    "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
)


def _through_builder(name: str, module: str, helper: str, kwargs: dict | None = None, **changes) -> nn.Module:
    """``torchvision.models.get_model(name)``, its builder's private helper (``_resnet``,
    ``_vision_transformer``, ...) called with the arguments in ``changes`` transformed: every
    other setting is the builder's own, not a copy of it."""
    tv = import_torchvision()
    owner = getattr(tv.models, module)
    original = getattr(owner, helper)
    signature = inspect.signature(original)

    def changed(*args, **kw):
        bound = signature.bind(*args, **kw)
        for arg, change in changes.items():
            bound.arguments[arg] = change(bound.arguments[arg])
        return original(*bound.args, **bound.kwargs)

    with mock.patch.object(owner, helper, changed):
        return tv.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **(kwargs or {}))


def _one_block_per_stage(settings: list) -> list:
    """ConvNeXt / EfficientNet stage settings, each stage one block deep."""
    out = []
    for s in settings:
        s = copy.copy(s)
        s.num_layers = 1
        out.append(s)
    return out


def _regnet_one_block_per_stage(name: str, width_divisor: int = 1) -> nn.Module:
    """The RegNet builder's own BlockParams (widths, group widths, bottleneck ratios, SE ratio,
    strides), each stage one block deep; widths and group widths divided by ``width_divisor``
    (every stage keeps its number of groups)."""
    tv = import_torchvision()
    regnet = tv.models.regnet
    full = regnet.BlockParams.from_init_params

    def one_block(*args, **kwargs):
        p = full(*args, **kwargs)
        assert all(w % g == 0 and g % width_divisor == 0 for w, g in zip(p.widths, p.group_widths))
        return regnet.BlockParams([1] * len(p.depths), [w // width_divisor for w in p.widths],
                                  [g // width_divisor for g in p.group_widths], p.bottleneck_multipliers, p.strides,
                                  p.se_ratio)

    with mock.patch.object(regnet.BlockParams, "from_init_params", one_block):
        return tv.models.get_model(name, weights=None, num_classes=NUM_CLASSES)


def _vgg_narrow_classifier(name: str) -> nn.Module:
    """torchvision's VGG (its own features: the configuration's convolutions, with or without
    BatchNorm) whose classifier's two hidden Linear layers are 64 wide instead of 4096."""
    tv = import_torchvision()
    vgg = tv.models.vgg
    full = vgg.VGG

    def narrow(features: nn.Module, num_classes: int, init_weights: bool = True, dropout: float = 0.5) -> nn.Module:
        with torch.device("meta"):  # the 4096-wide classifier, replaced below, is never allocated
            model = full(features, num_classes=num_classes, init_weights=False, dropout=dropout)
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(64, num_classes))
        return model

    with mock.patch.object(vgg, "VGG", narrow):
        return tv.models.get_model(name, weights=None, num_classes=NUM_CLASSES)


def _reduced(name: str, size: int, build: Callable[[], nn.Module], reduced: str, **kwargs) -> Spec:
    return Spec(f"torchvision:{name}", size, kwargs, build=build, reduced=reduced)


_VIT = "2 encoder layers of {n}: each is the same EncoderBlock (LayerNorm, attention, LayerNorm, MLP) at full width"
_RESNET = "one Bottleneck per stage (of {n}): the same blocks, widths and groups"
_CONVNEXT = "one CNBlock per stage (of {n}): the same blocks (LayerNorm, layer scale) and widths"
_EFFICIENTNET = "one block per stage: every stage's MBConv / FusedMBConv at its width, BatchNorm eps as the builder"
_REGNET = "one block per stage: the same widths, group width, bottleneck ratio and SE ratio"
_SWIN = "2 blocks per stage (of 2, 2, 18, 2): the regular and the shifted-window block at every width"
_VGG = ("the classifier's hidden layers 64 wide instead of 4096 (its Linear 25088->4096 alone is 103M of the "
        "~135M parameters); the features (convolutions and BatchNorms) are the configuration's, the classifier "
        "the same Linear/ReLU/Dropout layers; PyTorch's default init instead of VGG's")


def _vit_spec(name: str, size: int, layers: int) -> Spec:
    return _reduced(name, size, partial(_through_builder, name, "vision_transformer", "_vision_transformer",
                                        dict(image_size=size), num_layers=lambda n: 2),
                    _VIT.format(n=layers))


def _resnet_spec(name: str, layers: str) -> Spec:
    return _reduced(name, 32, partial(_through_builder, name, "resnet", "_resnet", layers=lambda n: [1, 1, 1, 1]),
                    _RESNET.format(n=layers))


def _convnext_spec(name: str, layers: str) -> Spec:
    return _reduced(name, 32, partial(_through_builder, name, "convnext", "_convnext",
                                      block_setting=_one_block_per_stage), _CONVNEXT.format(n=layers))


def _efficientnet_spec(name: str) -> Spec:
    return _reduced(name, 32, partial(_through_builder, name, "efficientnet", "_efficientnet",
                                      inverted_residual_setting=_one_block_per_stage), _EFFICIENTNET)


def _swin_spec(name: str) -> Spec:
    return _reduced(name, 32, partial(_through_builder, name, "swin_transformer", "_swin_transformer",
                                      depths=lambda d: [2] * len(d)), _SWIN)


TORCHVISION_SIZES: dict[str, int] = {"alexnet": 64}
TORCHVISION_OVERRIDES: dict[str, Spec] = {s.name: s for s in [
    _vit_spec("vit_b_16", 32, 12), _vit_spec("vit_b_32", 64, 12), _vit_spec("vit_l_16", 32, 24),
    _vit_spec("vit_l_32", 64, 24), _vit_spec("vit_h_14", 28, 32),
    _resnet_spec("resnet101", "3, 4, 23, 3"), _resnet_spec("resnet152", "3, 8, 36, 3"),
    _resnet_spec("resnext101_32x8d", "3, 4, 23, 3"), _resnet_spec("resnext101_64x4d", "3, 4, 23, 3"),
    _resnet_spec("wide_resnet50_2", "3, 4, 6, 3"), _resnet_spec("wide_resnet101_2", "3, 4, 23, 3"),
    _convnext_spec("convnext_small", "3, 3, 27, 3"), _convnext_spec("convnext_base", "3, 3, 27, 3"),
    _convnext_spec("convnext_large", "3, 3, 27, 3"),
    *(_efficientnet_spec(n) for n in ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_s",
                                      "efficientnet_v2_m", "efficientnet_v2_l")),
    *(_reduced(n, 32, partial(_regnet_one_block_per_stage, n), _REGNET)
      for n in ("regnet_x_16gf", "regnet_x_32gf", "regnet_y_16gf", "regnet_y_32gf")),
    _reduced("regnet_y_128gf", 32, partial(_regnet_one_block_per_stage, "regnet_y_128gf", 4),
             "one block per stage, widths (528, 1056, 2904, 7392) and group width 264 quartered: every stage keeps "
             "its number of groups (2, 4, 11, 28), bottleneck and SE ratio; at full width its one last-stage block "
             "alone is ~115M parameters (6 s here)"),
    *(_swin_spec(n) for n in ("swin_s", "swin_b", "swin_v2_s", "swin_v2_b")),
    *(_reduced(n, 32, partial(_vgg_narrow_classifier, n), _VGG)
      for n in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")),
    _reduced("maxvit_t", 64, partial(_through_builder, "maxvit_t", "maxvit", "_maxvit", dict(input_size=(64, 64)),
                                     partition_size=lambda p: 2, block_layers=lambda b: [1] * len(b)),
             "partition size 2 instead of 7 (windows and grids of 2x2 positions; 7 needs a 224 px input) and one "
             "MaxVitLayer (MBConv, window and grid attention) per stage (of 2, 2, 5, 2)"),
    Spec("torchvision:inception_v3", 75, dict(aux_logits=False), leaves_out=("InceptionAux",),
         reduced="no auxiliary classifier: its 5x5 convolution of a 5x5-pooled 17x17 map needs a 299 px input; it "
                 "is Conv2d + BatchNorm2d + ReLU (BasicConv2d) as every other block of the network"),
]}


def torchvision_specs() -> dict[str, Spec]:
    """One spec per name of :data:`TORCHVISION_NAMES`, in that order."""
    return {name: TORCHVISION_OVERRIDES.get(name) or Spec(f"torchvision:{name}", TORCHVISION_SIZES.get(name, 32))
            for name in TORCHVISION_NAMES}


# --- timm ---------------------------------------------------------------------------------------
# The smallest variant of each family, with the norm layers it brings ("timm X": timm.layers' own
# class; BatchNormAct2d, GroupNormAct, LayerNormAct2d: timm's norm + activation layers). Models
# with a fixed-resolution part (position embeddings, attention biases, windows) take img_size.

TIMM_SPECS: list[Spec] = [
    Spec("timm:resnet10t", 32),                                         # nn.BatchNorm2d, activation apart
    Spec("timm:resnest14d", 32),                                        # nn.BatchNorm2d, split attention
    Spec("timm:resnetv2_50x1_bit", 32),                                 # BiT: GroupNormAct (+ StdConv2d)
    Spec("timm:efficientnet_b0", 32),                                   # BatchNormAct2d (SiLU)
    Spec("timm:efficientnet_b0_gn", 32),                                # GroupNormAct
    Spec("timm:test_efficientnet_ln", 32),                              # LayerNormAct2d (timm's test-size EfficientNet)
    Spec("timm:mobilenetv3_small_100", 32),                             # BatchNormAct2d (ReLU, hard-swish)
    Spec("timm:mobilenetv4_conv_small", 32),                            # BatchNormAct2d, UIR blocks
    Spec("timm:regnetx_002", 32),                                       # BatchNormAct2d in ConvNormAct
    Spec("timm:regnetz_b16_evos", 32),                                  # EvoNorm2dS0a
    Spec("timm:densenet121", 32),                                       # BatchNormAct2d (pre-activation)
    Spec("timm:dpn48b", 32),                                            # BatchNormAct2d, CatBnAct
    Spec("timm:convnext_atto", 32),                                     # timm LayerNorm2d
    Spec("timm:convnext_atto_rms", 32),                                 # timm RmsNorm2d
    Spec("timm:convnext_zepto_rms", 32),                                # timm SimpleNorm2d
    Spec("timm:convnextv2_atto", 32),                                   # timm LayerNorm2d, GlobalResponseNorm
    Spec("timm:vit_tiny_patch16_224", 32, dict(img_size=32)),           # timm LayerNorm
    Spec("timm:deit_tiny_distilled_patch16_224", 32, dict(img_size=32)),  # timm LayerNorm, 2 heads
    Spec("timm:eva02_tiny_patch14_224", 28, dict(img_size=28)),         # timm LayerNorm, RoPE, SwiGLU
    Spec("timm:swin_tiny_patch4_window7_224", 32, dict(img_size=32)),   # nn.LayerNorm
    Spec("timm:poolformer_s12", 32),                                    # GroupNorm1 (an nn.GroupNorm), timm LayerNorm2d
    Spec("timm:poolformerv2_s12", 32),                                  # GroupNorm1NoBias, LayerNorm2dNoBias
    Spec("timm:mobilevit_xxs", 32),                                     # BatchNormAct2d, nn.LayerNorm
    Spec("timm:mobilevitv2_050", 32),                                   # BatchNormAct2d, GroupNorm1
    Spec("timm:levit_128s", 32, dict(img_size=32)),                     # nn.BatchNorm1d/2d in LinearNorm / ConvNorm
    Spec("timm:edgenext_xx_small", 32),                                 # timm LayerNorm2d, nn.LayerNorm
    Spec("timm:cspresnet50", 32),                                       # BatchNormAct2d, CSP stages
    Spec("timm:repvgg_a0", 32),                                         # BatchNormAct2d, RepVGG blocks
    Spec("timm:nf_regnet_b0", 32),                                      # normaliser-free: no norm layer
    Spec("timm:coatnet_pico_rw_224", 32, dict(img_size=32)),            # BatchNormAct2d, timm LayerNorm2d
    Spec("timm:coat_lite_tiny", 32, dict(img_size=32)),                 # nn.LayerNorm, timm LayerNorm
    Spec("timm:rexnet_100", 32),                                        # BatchNormAct2d, nn.BatchNorm2d
    Spec("timm:ghostnet_050", 32),                                      # BatchNormAct2d, nn.BatchNorm2d
    Spec("timm:convmixer_768_32", 14),                                  # nn.BatchNorm2d after the activation
    Spec("timm:mixer_s16_224", 32, dict(img_size=32)),                  # nn.LayerNorm
    Spec("timm:gmlp_ti16_224", 32, dict(img_size=32)),                  # nn.LayerNorm, also in the gating unit
    Spec("timm:resmlp_12_224", 32, dict(img_size=32)),                  # Affine only: no norm layer
    Spec("timm:hrnet_w18_small", 32),                                   # nn.BatchNorm2d, multi-resolution fusion
    Spec("timm:dla46_c", 32),                                           # nn.BatchNorm2d, aggregation nodes
    Spec("timm:fastvit_t8", 32),                                        # BatchNormAct2d, nn.BatchNorm2d, MobileOne
    Spec("timm:efficientformerv2_s0", 32, dict(img_size=32)),           # BatchNormAct2d, nn.BatchNorm2d, attention
    Spec("timm:maxvit_pico_rw_256", 32, dict(img_size=32)),             # BatchNormAct2d, timm LayerNorm / LayerNorm2d
    Spec("timm:ese_vovnet19b_slim_dw", 32),                             # BatchNormAct2d, OSA blocks
    Spec("timm:hgnetv2_b0", 32),                                        # nn.BatchNorm2d, LearnableAffineBlock
    Spec("timm:pvt_v2_b0", 32),                                         # nn.LayerNorm, timm LayerNorm
    Spec("timm:xcit_nano_12_p16_224", 32, dict(img_size=32)),           # nn.BatchNorm2d, nn.LayerNorm
    Spec("timm:tiny_vit_5m_224", 32),                                   # nn.BatchNorm2d, nn.LayerNorm, timm LayerNorm2d
    Spec("timm:mambaout_femto", 32),                                    # timm LayerNorm (NHWC)
    Spec("timm:starnet_s050", 32),                                      # nn.BatchNorm2d
    Spec("timm:efficientvit_b0", 32),                                   # nn.BatchNorm2d, LayerNorm2d (an nn.LayerNorm)
    Spec("timm:efficientvit_m0", 32, dict(img_size=32)),                # nn.BatchNorm1d/2d
    Spec("timm:gcvit_xxtiny", 32, dict(img_size=32)),                   # timm LayerNorm / LayerNorm2d
    Spec("timm:inception_next_atto", 32),                               # nn.BatchNorm2d, nn.LayerNorm in the head
    Spec("timm:pit_ti_224", 32, dict(img_size=32)),                     # nn.LayerNorm
    Spec("timm:convit_tiny", 32, dict(img_size=32)),                    # timm LayerNorm, gated positional attention
    Spec("timm:hiera_tiny_224", 32, dict(img_size=32)),                 # timm LayerNorm, mask-unit attention
]


def specs() -> list[Spec]:
    """The matrix: every torchvision spec, then the timm specs."""
    return list(torchvision_specs().values()) + TIMM_SPECS
