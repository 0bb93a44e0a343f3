"""The image frame: sizes worked out by hand, padding values, maps both ways."""
import numpy as np
import pytest

from part_distillation.data.frame import IMAGE_PAD_VALUE, ImageFrame, fitted_size


@pytest.mark.parametrize("hw, expected", [
    ((480, 640), (480, 640)),      # already fitted
    ((375, 500), (480, 640)),      # 500 -> 640: x1.28; 375*1.28 = 480
    ((1000, 250), (640, 160)),     # portrait, scaled down
    ((100, 50), (640, 320)),       # small images are scaled up
    ((333, 1000), (213, 640)),     # 333*0.64 = 213.12 -> 213
])
def test_fitted_size_longer_side_is_640(hw, expected):
    assert fitted_size(*hw) == expected


def test_fit_and_pad_image_grey_bottom_right():
    image = np.full((375, 500, 3), 7, np.uint8)
    frame = ImageFrame.fit(image.shape[:2], canvas=640)
    fitted = frame.fit_image(image)
    assert fitted.shape == (480, 640, 3) and (fitted == 7).all()
    canvas = frame.pad_image(fitted)
    assert canvas.shape == (640, 640, 3)
    assert (canvas[:480] == 7).all() and (canvas[480:] == IMAGE_PAD_VALUE).all()


def test_pad_masks_with_zero_and_crop_back():
    frame = ImageFrame((300, 600), (320, 640), canvas=640)
    masks = np.ones((2, 320, 640), bool)
    padded = frame.pad_masks(masks)
    assert padded.shape == (2, 640, 640)
    assert padded[:, :320].all() and not padded[:, 320:].any()
    assert (frame.crop_to_fitted(padded) == masks).all()


def test_masks_round_trip_and_boxes():
    frame = ImageFrame.fit((100, 200))  # fitted (320, 640): x3.2
    original = np.zeros((1, 100, 200), bool)
    original[0, 10:50, 20:120] = True
    fitted = frame.masks_to_fitted(original)
    assert fitted.shape == (1, 320, 640)
    assert fitted.sum() == pytest.approx(original.sum() * 3.2 * 3.2, rel=0.02)
    assert (frame.masks_to_original(fitted) == original).all()
    boxes = np.array([[20, 10, 120, 50]])
    np.testing.assert_allclose(frame.boxes_to_fitted(boxes), [[64, 32, 384, 160]])
    np.testing.assert_allclose(frame.boxes_to_original(frame.boxes_to_fitted(boxes)), boxes)


def test_record_round_trip_and_wrong_sizes_refused():
    frame = ImageFrame.fit((375, 500))
    assert ImageFrame.from_record({"key": "a", **frame.as_record()}) == frame
    with pytest.raises(KeyError, match="fitted frame"):
        ImageFrame.from_record({"key": "a"})
    with pytest.raises(ValueError, match="original size"):
        frame.fit_image(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="expected frame size"):
        frame.masks_to_original(np.zeros((1, 10, 10), bool))
