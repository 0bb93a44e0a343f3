"""Tests of the dense-CRF refinement (stage 3): the reference call and its fast variant."""
from __future__ import annotations

import numpy as np
import pytest

from part_distillation.masks import label_map_miou
from part_distillation.models.dense_crf import CRFParams, crop_box, dense_crf, dense_crf_reference

SIZE = 160




def scene(seed: int = 0, salt: float = 0.0, noise: float = 6.0):
    """A textured background with a two-colour object (parts 1 and 2), its true labels,
    and labels made at 1/8 resolution (blocky boundaries) with optional salt noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    obj = ((yy - 80) / 45.0) ** 2 + ((xx - 75) / 55.0) ** 2 < 1
    truth = np.where(obj, np.where(xx + 0.3 * yy < 95, 1, 2), 0)
    colours = np.array([[90, 120, 90], [200, 60, 40], [40, 70, 200]], dtype=np.float64)
    image = colours[truth] + rng.normal(0, noise, (SIZE, SIZE, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    coarse = np.kron(truth[4::8, 4::8], np.ones((8, 8), dtype=np.int64))
    labels = coarse.copy()
    if salt:
        flip = (rng.random(labels.shape) < salt) & (labels > 0)
        labels[flip] = 3 - labels[flip]  # the other part
    return image, labels, truth


def test_reference_output_shape_dtype_and_label_set():
    image, labels, _ = scene()
    for dtype in (np.int64, np.uint8, np.int32):
        out = dense_crf_reference(image, labels.astype(dtype))
        assert out.shape == labels.shape and out.dtype == dtype
        assert set(np.unique(out)) <= set(np.unique(labels))
    fast = dense_crf(image, labels.astype(np.uint8))
    assert fast.shape == labels.shape and fast.dtype == np.uint8
    assert set(np.unique(fast)) <= set(np.unique(labels))


def test_crf_snaps_blocky_labels_to_the_image():
    image, labels, truth = scene()
    out = dense_crf_reference(image, labels)
    assert label_map_miou(out, truth) > label_map_miou(labels, truth) + 0.02
    assert label_map_miou(out, truth) > 0.97


def test_salt_noise_inside_a_uniform_part_is_removed():
    image, labels, truth = scene(salt=0.03)
    salt = (labels != truth) & (truth > 0) & (labels > 0)
    interior = salt & (np.abs(np.gradient(truth.astype(float))[1]) == 0)
    assert interior.sum() > 100
    for refine in (dense_crf_reference, dense_crf):
        out = refine(image, labels)
        assert (out[interior] == truth[interior]).mean() > 0.95, refine.__name__


def test_fast_variant_agrees_with_the_reference():
    image, labels, _ = scene(seed=1, salt=0.01, noise=12.0)
    reference = dense_crf_reference(image, labels)
    assert label_map_miou(dense_crf(image, labels), reference) >= 0.98
    assert label_map_miou(dense_crf(image, labels, factor=1), reference) >= 0.99  # box only


def test_fast_variant_leaves_far_background_alone():
    image, labels, _ = scene()
    big = np.zeros((400, 400), dtype=labels.dtype)
    big[:SIZE, :SIZE] = labels
    big_image = np.zeros((400, 400, 3), dtype=np.uint8)
    big_image[:SIZE, :SIZE] = image
    out = dense_crf(big_image, big)
    y0, y1, x0, x1 = crop_box(big, 60)
    outside = np.ones(big.shape, dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert outside.any() and (out[outside] == 0).all()


def test_only_background_or_one_label_comes_back_unchanged():
    image, _, _ = scene()
    zeros = np.zeros((SIZE, SIZE), dtype=np.int64)
    assert (dense_crf_reference(image, zeros) == 0).all()
    assert (dense_crf(image, zeros) == 0).all()


def test_crop_box():
    labels = np.zeros((50, 60), dtype=np.int64)
    labels[10:20, 30:35] = 2
    assert crop_box(labels, 5) == (5, 25, 25, 40)
    assert crop_box(labels, 100) == (0, 50, 0, 60)
    assert crop_box(np.zeros((4, 4), dtype=np.int64), 1) is None


def test_invalid_inputs_give_clear_errors():
    image, labels, _ = scene()
    with pytest.raises(ValueError, match="labels must be"):
        dense_crf_reference(image, labels[:-1])
    with pytest.raises(TypeError, match="uint8"):
        dense_crf_reference(image.astype(np.float32), labels)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        dense_crf(image[..., :2], labels)
    with pytest.raises(TypeError, match="integers"):
        dense_crf(image, labels.astype(np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        dense_crf(image, labels - 1)
    with pytest.raises(ValueError, match="n_labels"):
        dense_crf(image, labels, n_labels=2)
    with pytest.raises(ValueError, match="factor"):
        dense_crf(image, labels, factor=0.5)


def reference_script_crf(image: np.ndarray, labels: np.ndarray, bilateral_compat: float = 10) -> np.ndarray:
    """The reference script's CRF call, written out as it is there (docs/method.md#stage-3):
    pydensecrf's default kernel and normalisation, number of labels = parts + 1."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    height, width = labels.shape
    n_labels = int(labels.max()) + 1
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=20, srgb=13, rgbim=np.ascontiguousarray(image), compat=bilateral_compat)
    q = crf.inference(10)
    return np.argmax(np.array(q), axis=0).reshape(height, width)


@pytest.mark.parametrize("seed, salt, noise, crop", [(0, 0.0, 6.0, None), (1, 0.01, 12.0, None),
                                                      (2, 0.03, 20.0, (slice(10, 150), slice(0, 120)))])
def test_reference_equals_the_reference_scripts_crf_call(seed, salt, noise, crop):
    image, labels, _ = scene(seed=seed, salt=salt, noise=noise)
    if crop is not None:  # non-square
        image, labels = np.ascontiguousarray(image[crop]), np.ascontiguousarray(labels[crop])
    expected = reference_script_crf(image, labels)
    assert np.array_equal(dense_crf_reference(image, labels), expected)
    assert np.array_equal(dense_crf_reference(image, labels.astype(np.uint8)), expected)
    # the comparison can fail: another setting of the script changes the answer on this scene
    assert not np.array_equal(reference_script_crf(image, labels, bilateral_compat=3), expected)


def test_params_change_the_answer_as_the_script_would():
    image, labels, _ = scene(seed=1, salt=0.01, noise=12.0)
    weaker = dense_crf_reference(image, labels, params=CRFParams(bilateral_compat=3.0))
    assert np.array_equal(weaker, reference_script_crf(image, labels, bilateral_compat=3))


def test_read_only_image_is_accepted():
    """Images fitted with PIL come back as read-only arrays; pydensecrf needs a writable one."""
    image, labels, _ = scene()
    frozen = image.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(dense_crf_reference(frozen, labels), dense_crf_reference(image, labels))
    np.testing.assert_array_equal(dense_crf(frozen, labels), dense_crf(image, labels))
