import numpy as np
import pytest

from part_distillation.data import transforms as T
from part_distillation.data.transforms import AugmentConfig, augment, augment_with_retries, weak_augment


def _sample(h=60, w=80, parts=((5, 25, 10, 40), (30, 55, 40, 75))):
    image = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    masks = np.zeros((len(parts), h, w), dtype=bool)
    for i, (y0, y1, x0, x1) in enumerate(parts):
        masks[i, y0:y1, x0:x1] = True
    return image, masks


def test_output_is_the_fixed_size_with_grey_image_and_zero_mask_padding():
    cfg = AugmentConfig(size=64, scale_range=(0.3, 0.3), flip_prob=0.0, crop_range=(1.0, 1.0))
    image, masks = _sample(h=60, w=80)
    out = augment(image, masks, np.random.default_rng(1), cfg)
    # scale factor = min(0.3*64/60, 0.3*64/80) = 0.24 -> 14 x 19 (rounded), rest is padding
    assert out.image.shape == (64, 64, 3) and out.masks.shape[1:] == (64, 64)
    assert out.image.dtype == np.uint8 and out.masks.dtype == bool
    assert (out.image[14:, :] == 128).all() and (out.image[:, 19:] == 128).all()
    assert not out.masks[:, 14:, :].any() and not out.masks[:, :, 19:].any()
    assert out.masks[:, :14, :19].any()


def test_large_scale_is_cropped_to_the_fixed_size():
    cfg = AugmentConfig(size=64, scale_range=(2.0, 2.0), flip_prob=0.0, crop_range=(1.0, 1.0), min_part_ratio=0.0)
    image, masks = _sample(h=60, w=80)
    out = augment(image, masks, np.random.default_rng(3), cfg)
    assert out.image.shape == (64, 64, 3)
    # the rescaled image is 96 x 128 (larger than 64 both ways): a crop, no grey padding
    assert not (out.image == 128).all(axis=2).all(axis=1).any()
    assert T.random_rescale(image, masks, np.random.default_rng(0), (2.0, 2.0), 64)[0].shape[:2] == (96, 128)


def test_relative_crop_keeps_90_to_100_percent_of_each_side():
    image, masks = _sample(h=100, w=200)
    rng = np.random.default_rng(0)
    for _ in range(50):
        crop, cmasks = T.random_relative_crop(image, masks, rng, (0.9, 1.0))
        assert 90 <= crop.shape[0] <= 100 and 180 <= crop.shape[1] <= 200
        assert cmasks.shape[1:] == crop.shape[:2]


def test_flip_moves_masks_with_the_image():
    image, masks = _sample()
    flipped, fmasks = T.random_flip(image, masks, np.random.default_rng(0), prob=1.0)
    assert np.array_equal(flipped, image[:, ::-1]) and np.array_equal(fmasks, masks[:, :, ::-1])


def test_part_area_filter_uses_the_total_part_area():
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, :5] = True          # 50 px
    masks[1, 5:9] = True         # 40 px
    masks[2, 9, :4] = True       # 4 px: 4 / 94 = 4.3% <= 5%
    assert T.part_area_filter(masks, 0.05).tolist() == [0, 1]
    assert T.part_area_filter(masks, 0.04).tolist() == [0, 1, 2]
    assert T.part_area_filter(np.zeros((2, 4, 4), bool), 0.05).tolist() == []


def test_retries_until_a_part_survives_then_weak_fallback():
    cfg = AugmentConfig(size=32, max_tries=100)
    image, masks = _sample(h=32, w=32, parts=((0, 2, 0, 2),))  # one tiny corner part
    # crop at 90%+ with a random offset often loses the corner: retries keep at least one part
    out = augment_with_retries(image, masks, np.random.default_rng(0), cfg)
    assert len(out.kept) == 1 and out.masks.any()
    # a part that no strong augmentation can keep (empty mask) -> the weak augmentation
    empty = np.zeros((1, 32, 32), dtype=bool)
    calls = []
    real = T.augment

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    T.augment = counting
    try:
        out = augment_with_retries(image, empty, np.random.default_rng(0), cfg)
    finally:
        T.augment = real
    assert len(calls) == 100 and out.weak and len(out.kept) == 0
    assert out.image.shape == (32, 32, 3)
    assert np.array_equal(out.image, image) or np.array_equal(out.image, image[:, ::-1])  # the weak flip


def test_weak_augmentation_is_flip_and_pad_only():
    image, masks = _sample(h=40, w=64)
    out = weak_augment(image, masks, np.random.default_rng(0), AugmentConfig(size=64, flip_prob=0.0))
    assert np.array_equal(out.image[:40], image) and (out.image[40:] == 128).all()
    assert np.array_equal(out.masks[:, :40], masks) and not out.masks[:, 40:].any()
    # the reference's weak augmentation keeps the random flip
    out = weak_augment(image, masks, np.random.default_rng(0), AugmentConfig(size=64, flip_prob=1.0))
    assert np.array_equal(out.image[:40], image[:, ::-1]) and (out.image[40:] == 128).all()
    assert np.array_equal(out.masks[:, :40], masks[..., ::-1]) and not out.masks[:, 40:].any()
    flips = {bool(np.array_equal(weak_augment(image, masks, np.random.default_rng(seed), AugmentConfig(size=64))
                                 .image[:40], image[:, ::-1])) for seed in range(20)}
    assert flips == {True, False}  # p = 0.5


def test_square_canvas_is_padded_before_augmentation():
    """Stage 6 (SET_IMAGE_SQUARE): the fitted image is padded to the grey canvas first, so the
    flip mirrors the whole canvas: a tall image ends up at the right, the grey border at the left."""
    image, masks = _sample(h=64, w=40, parts=((5, 25, 5, 20), (30, 60, 10, 35)))
    cfg = dict(size=64, flip_prob=1.0, crop_range=(1.0, 1.0), scale_range=(1.0, 1.0), min_part_ratio=0.0)
    square = augment_with_retries(image, masks, np.random.default_rng(0), AugmentConfig(**cfg, square_canvas=True))
    assert (square.image[:, :24] == 128).all() and np.array_equal(square.image[:, 24:], image[:, ::-1])
    assert not square.masks[..., :24].any() and np.array_equal(square.masks[..., 24:], masks[..., ::-1])
    plain = augment_with_retries(image, masks, np.random.default_rng(0), AugmentConfig(**cfg))
    assert np.array_equal(plain.image[:, :40], image[:, ::-1]) and (plain.image[:, 40:] == 128).all()
    assert np.array_equal(plain.masks[..., :40], masks[..., ::-1]) and not plain.masks[..., 40:].any()


def test_same_generator_seed_same_augmentation():
    cfg = AugmentConfig(size=48)
    image, masks = _sample()
    a = augment_with_retries(image, masks, np.random.default_rng([0, 1, 2]), cfg)
    b = augment_with_retries(image, masks, np.random.default_rng([0, 1, 2]), cfg)
    c = augment_with_retries(image, masks, np.random.default_rng([0, 2, 2]), cfg)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("scale", [0.1, 1.0, 2.0])
def test_rescale_factor_matches_resize_scale(scale):
    image, masks = _sample(h=60, w=80)
    out, omasks = T.random_rescale(image, masks, np.random.default_rng(0), (scale, scale), 640)
    factor = min(scale * 640 / 60, scale * 640 / 80)
    assert out.shape[:2] == (round(60 * factor), round(80 * factor)) == omasks.shape[1:]
