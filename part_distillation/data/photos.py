"""Real photos as a tiny ImageNet-style tree: the photos ``scikit-image`` ships.

The demo's real-photo check runs the object-mask (GrabCut), pixel-grouping
(pretrained EfficientNet-Lite0) and dense-CRF stages on real pixels rather than the
synthetic shapes, with nothing downloaded: ``skimage.data`` carries the images.
One class folder per photo, named by the ImageNet synset of what it shows.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from part_distillation.store.files import atomic_open

#: skimage.data function -> (synset, class name): what each photo shows.
PHOTOS: dict[str, tuple[str, str]] = {
    "chelsea": ("n02123045", "tabby, tabby cat"),
    "coffee": ("n07920052", "espresso"),
    "rocket": ("n04266014", "space shuttle"),
    "astronaut": ("n09797873", "astronaut, spaceman, cosmonaut"),
}


def write_photo_tree(root: str | os.PathLike, split: str = "train") -> list[Path]:
    """Write ``<root>/<split>/<wnid>/<name>.png`` and ``<root>/words.txt``; idempotent.

    Returns the image paths. Raises ImportError naming the package when scikit-image is
    missing.
    """
    try:
        from skimage import data as skdata
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("the real-photo check needs scikit-image (pip install scikit-image)") from err
    root = Path(root)
    paths = []
    for name, (wnid, _) in PHOTOS.items():
        path = root / split / wnid / f"{name}.png"
        if not path.is_file():
            image = np.asarray(getattr(skdata, name)())
            if image.ndim == 2:
                image = np.stack([image] * 3, axis=-1)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                Image.fromarray(image[..., :3].astype(np.uint8)).save(f, format="PNG")
        paths.append(path)
    words = "".join(f"{wnid}\t{label}\n" for wnid, label in PHOTOS.values())
    words_file = root / "words.txt"
    if not words_file.is_file() or words_file.read_text() != words:
        words_file.write_text(words)
    return paths
