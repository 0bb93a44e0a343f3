"""EfficientNet-Lite0: architecture, TF "same" padding, and proof the weights are the pretrained ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from part_distillation.data.batching import PIXEL_MEAN, PIXEL_STD
from part_distillation.models.efficientnet import (
    LEVEL_CHANNELS,
    SameConv2d,
    build_efficientnet_lite0,
    pretrained_weights_path,
)

skdata = pytest.importorskip("skimage.data")

# ImageNet-1k class indices (standard synset order) accepted as "plausible" per photo.
CAT_CLASSES = {281, 282, 283, 284, 285}          # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}                 # espresso, cup, coffee mug
ROCKET_CLASSES = {657, 744, 812}                 # missile, projectile, space shuttle


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return build_efficientnet_lite0()


def _top5(model, image: np.ndarray) -> set[int]:
    image = np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR), dtype=np.float32)
    x = (torch.from_numpy(image).permute(2, 0, 1) - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) \
        / torch.tensor(PIXEL_STD).view(3, 1, 1)
    with torch.no_grad():
        return set(model(x[None])["logits"][0].topk(5).indices.tolist())


def test_checkpoint_has_296_tensors_and_loads_strictly_into_465m_parameters(model):
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    assert set(state) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 4_652_008


@pytest.mark.parametrize("photo, classes", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES),
                                            ("rocket", ROCKET_CLASSES)])
def test_skimage_photos_get_a_plausible_imagenet_class_in_top5(model, photo, classes):
    assert _top5(model, getattr(skdata, photo)()) & classes


def test_random_weights_do_not_recognise_the_cat():
    torch.manual_seed(0)
    assert not _top5(build_efficientnet_lite0(pretrained=False), skdata.chelsea()) & CAT_CLASSES


def test_feature_levels_have_the_stated_strides_and_channels(model):
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 96))
    for name, stride in (("stride4", 4), ("stride8", 8), ("stride16", 16), ("stride32", 32)):
        assert tuple(out[name].shape) == (2, LEVEL_CHANNELS[name], 64 // stride, 96 // stride)
    assert tuple(out["logits"].shape) == (2, 1000)
    with torch.no_grad():
        only = model.features(torch.zeros(1, 3, 64, 64), ("stride8",))
    assert list(only) == ["stride8"]
    with pytest.raises(KeyError, match="stride7"):
        model.features(torch.zeros(1, 3, 64, 64), ("stride7",))


def test_same_padding_matches_tensorflow_rule():
    # TF "same", stride 2, k=3 on an even input pads 0 before and 1 after: the first output
    # sees input rows/cols 0..2, the last output the last input plus one zero.
    conv = SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        x = torch.ones(1, 1, 4, 4)
        y = conv(x)
    assert y.shape[-2:] == (2, 2)
    assert y[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
