"""The real-photo tree: four skimage photos as an ImageNet-style tree the index reads."""
import numpy as np

from part_distillation.data.imagenet import list_image_tree
from part_distillation.data.images import load_rgb
from part_distillation.data.photos import PHOTOS, write_photo_tree


def test_photo_tree_is_an_imagenet_tree_and_idempotent(tmp_path):
    paths = write_photo_tree(tmp_path)
    assert len(paths) == 4
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_photo_tree(tmp_path) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes   # not rewritten
    tree = list_image_tree(tmp_path, split="train", words_file=tmp_path / "words.txt")
    assert len(tree) == 4
    assert sorted(ref.wnid for ref in tree.images) == sorted(w for w, _ in PHOTOS.values())
    cat = load_rgb(tmp_path / "train" / "n02123045" / "chelsea.png")
    assert cat.shape == (300, 451, 3) and cat.dtype == np.uint8 and cat.std() > 10
