"""A synthetic part dataset: small images of made-up objects whose parts are known.

It stands in for ImageNet + PartImageNet wherever the real data is absent (tests, the
demo, benchmarks): the whole pipeline can run on it and be scored against true parts.

Each object class is a template: a body plus named parts (head, leg, tail, ...) placed
around it, each with its own shape, colour and texture. These are the same in every
image of the class (so a part learner can find them) and differ between the parts of a
class (saturated, evenly spaced hues). Every image shows one object of its class under a
random pose (rotation, mirror), scale, aspect and position, fully inside the frame, on a
cluttered background of low-saturation shapes and noise, so colour alone separates the
object from the clutter but the background is not flat.

Written to disk as
- ``<out>/<split>/<wnid>/<wnid>_<nnnnn>.JPEG``: an ImageNet-style tree (wnids
  ``n90000001``, ...; JPEG quality 95 like ImageNet, or PNG);
- ``<out>/words.txt``: ``wnid<TAB>name`` per class (the union over the splits written);
- ``<out>/annotations/<split>.json``: PartImageNet-style COCO json of the parts (one
  category per (class, part), ``name`` "<class> <part>", ``supercategory`` the class
  name, extra keys ``part`` and ``wnid``; RLE segmentation, bbox, area);
- ``<out>/annotations/objects_<split>.json``: a separate plain COCO json of the object
  masks (one category per class). Kept apart so the part file stays exactly what a
  PartImageNet reader expects, while the object file serves as given object masks.
Image ``file_name`` is relative to the split folder (``<wnid>/<file>``).

Deterministic: templates depend only on the seed and the class index, an image only on
the seed, split, class and image index, so the same arguments give identical pixels and
byte-identical json, and asking for more images keeps the earlier ones.
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
import logging
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from part_distillation.masks import encode_rle, rle_area, rle_to_bbox
from part_distillation.store.files import atomic_write_text

logger = logging.getLogger(__name__)

PART_NAMES = ("head", "leg", "tail", "wing", "arm", "wheel", "handle", "fin", "ear", "horn", "neck", "beak",
              "foot", "seat", "sail", "mouth")
CLASS_NAMES = ("rover", "lantern", "beetle", "kite", "robot", "crab", "teapot", "drone", "tractor", "owl",
               "cactus", "submarine", "windmill", "scooter", "jellyfish", "rocket")
SHAPES = ("ellipse", "box", "triangle")
TEXTURES = ("solid", "stripes", "checker", "dots")
FIRST_WNID = 90000001

ImageFormat = Literal["JPEG", "PNG"]


@dataclass(frozen=True)
class PartTemplate:
    """One part in the object's canonical frame (object centred at 0, body radius ~0.5)."""

    name: str
    shape: str                           #: one of SHAPES
    center: tuple[float, float]
    radii: tuple[float, float]           #: half extent along / across the part's axis
    angle: float                         #: axis direction, radians
    color: tuple[int, int, int]
    color2: tuple[int, int, int]         #: second colour of the texture
    texture: str                         #: one of TEXTURES
    period: float                        #: texture period, canonical units

    @property
    def extent(self) -> float:
        """Radius around the origin that contains the part."""
        return math.hypot(*self.center) + math.hypot(*self.radii)


@dataclass(frozen=True)
class ClassTemplate:
    wnid: str
    name: str
    parts: tuple[PartTemplate, ...]      #: drawn in order; parts[0] is the body

    @property
    def extent(self) -> float:
        return max(p.extent for p in self.parts)


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered image: pixels, part label map (0 = background, k = parts[k-1])."""

    image: np.ndarray                    #: uint8 (H, W, 3)
    labels: np.ndarray                   #: uint8 (H, W)


@dataclass(frozen=True)
class SyntheticSummary:
    """Where a generated split lies and how much it holds."""

    root: Path
    split: str
    image_dir: Path                      #: the split folder of the ImageNet-style tree
    words_file: Path
    parts_json: Path
    objects_json: Path
    wnids: tuple[str, ...]
    class_names: tuple[str, ...]
    num_images: int
    num_part_categories: int
    num_part_annotations: int


def class_templates(num_classes: int, parts_per_class: int = 4, seed: int = 0,
                    shared_appearance: bool = False) -> list[ClassTemplate]:
    """The object classes of a synthetic dataset (the same for every split).

    ``shared_appearance``: every part of an object takes the body's colours and texture
    (real parts often share fur or paint), so colour alone cannot separate the parts;
    shapes and poses stay exactly those of the default templates.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 2 <= parts_per_class <= len(PART_NAMES) + 1:
        raise ValueError(f"parts_per_class must be in [2, {len(PART_NAMES) + 1}], got {parts_per_class}")
    templates = [_class_template(k, parts_per_class, seed) for k in range(num_classes)]
    if shared_appearance:
        templates = [dataclasses.replace(t, parts=tuple(
            dataclasses.replace(p, color=t.parts[0].color, color2=t.parts[0].color2, texture=t.parts[0].texture,
                                period=t.parts[0].period) for p in t.parts)) for t in templates]
    return templates


def render_sample(template: ClassTemplate, size: int | tuple[int, int], rng: np.random.Generator) -> SyntheticSample:
    """Draw one object of ``template`` on clutter; ``size`` is a side or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(width, height) < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {width}x{height}")
    image = _background(rng, height, width)

    # Pose: canonical (u, v) -> image (x, y) = T + Rot(theta) * diag(sx, sy) * mirror * (u, v).
    theta = rng.uniform(-math.pi / 4, math.pi / 4)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    aspect = math.exp(rng.uniform(-0.2, 0.2))
    radius_px = rng.uniform(0.28, 0.46) * min(width, height)      # bounding radius of the object
    scale = radius_px / (template.extent * max(aspect, 1 / aspect))
    sx, sy = scale * aspect, scale / aspect
    tx = rng.uniform(radius_px, width - radius_px)
    ty = rng.uniform(radius_px, height - radius_px)
    brightness = rng.uniform(0.85, 1.1)

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    dx, dy = xs - tx, ys - ty
    cos, sin = math.cos(theta), math.sin(theta)
    u = mirror * (cos * dx + sin * dy) / sx
    v = (-sin * dx + cos * dy) / sy

    labels = np.zeros((height, width), dtype=np.uint8)
    for index, part in enumerate(template.parts, start=1):
        pu, pv = _to_part_frame(u, v, part)
        inside = _inside(part.shape, pu, pv, part.radii)
        if not inside.any():
            continue
        labels[inside] = index
        pattern = _texture(part.texture, pu[inside], pv[inside], part.period)
        colors = np.where(pattern[:, None], np.asarray(part.color2, np.float64), np.asarray(part.color, np.float64))
        image[inside] = colors * brightness
    image += rng.normal(0.0, 3.0, image.shape)
    return SyntheticSample(image=np.clip(np.rint(image), 0, 255).astype(np.uint8), labels=labels)


def make_synthetic_dataset(out: str | os.PathLike, num_classes: int = 4, images_per_class: int = 10,
                           size: int | tuple[int, int] = 128, seed: int = 0, parts_per_class: int = 4,
                           split: str = "train", image_format: ImageFormat = "JPEG", jpeg_quality: int = 95,
                           overwrite: bool = False, shared_appearance: bool = False) -> SyntheticSummary:
    """Generate one split of the synthetic dataset under ``out`` (see the module notes).

    An existing, non-empty split folder is an error unless ``overwrite``, which deletes
    that split's images and annotation files first (other splits are kept).
    ``shared_appearance``: all parts of an object share one colour/texture (see
    :func:`class_templates`).
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(width, height) < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {width}x{height}")
    if image_format not in ("JPEG", "PNG"):
        raise ValueError(f"image_format must be 'JPEG' or 'PNG', got {image_format!r}")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"invalid split name {split!r}")
    root = Path(out)
    image_dir = root / split
    ann_dir = root / "annotations"
    parts_json, objects_json = ann_dir / f"{split}.json", ann_dir / f"objects_{split}.json"
    if image_dir.exists() and any(image_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{image_dir} already holds files (overwrite to replace the split)")
        shutil.rmtree(image_dir)
        for stale in (parts_json, objects_json):
            stale.unlink(missing_ok=True)

    templates = class_templates(num_classes, parts_per_class, seed, shared_appearance)
    extension = ".JPEG" if image_format == "JPEG" else ".png"
    split_code = zlib.crc32(split.encode("utf-8"))

    images, part_anns, object_anns = [], [], []
    part_categories, object_categories, category_of = [], [], {}
    for class_index, template in enumerate(templates):
        object_categories.append({"id": class_index + 1, "name": template.name, "supercategory": "object",
                                  "wnid": template.wnid})
        for part_index, part in enumerate(template.parts):
            category_of[class_index, part_index] = len(part_categories) + 1
            part_categories.append({"id": len(part_categories) + 1, "name": f"{template.name} {part.name}",
                                    "supercategory": template.name, "part": part.name, "wnid": template.wnid})

    for class_index, template in enumerate(templates):
        (image_dir / template.wnid).mkdir(parents=True, exist_ok=True)
        for image_index in range(images_per_class):
            rng = np.random.default_rng([seed, split_code, class_index, image_index])
            sample = render_sample(template, (width, height), rng)
            file_name = f"{template.wnid}/{template.wnid}_{image_index:05d}{extension}"
            _save(sample.image, image_dir / file_name, image_format, jpeg_quality)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                           "wnid": template.wnid})
            for part_index in range(len(template.parts)):
                mask = sample.labels == part_index + 1
                if mask.any():
                    part_anns.append(_annotation(len(part_anns) + 1, image_id,
                                                 category_of[class_index, part_index], mask))
            object_anns.append(_annotation(len(object_anns) + 1, image_id, class_index + 1, sample.labels > 0))

    info = {"description": "PartDistillation synthetic part dataset", "version": 1, "seed": seed,
            "split": split, "parts_per_class": parts_per_class, "shared_appearance": shared_appearance}
    ann_dir.mkdir(parents=True, exist_ok=True)
    _write_json(parts_json, {"info": info, "images": images, "categories": part_categories,
                             "annotations": part_anns})
    _write_json(objects_json, {"info": info, "images": images, "categories": object_categories,
                               "annotations": object_anns})
    words_file = _write_words(root / "words.txt", templates)
    return SyntheticSummary(root=root, split=split, image_dir=image_dir, words_file=words_file,
                            parts_json=parts_json, objects_json=objects_json,
                            wnids=tuple(t.wnid for t in templates), class_names=tuple(t.name for t in templates),
                            num_images=len(images), num_part_categories=len(part_categories),
                            num_part_annotations=len(part_anns))


# --------------------------------------------------------------------------- templates

def _class_template(class_index: int, parts_per_class: int, seed: int) -> ClassTemplate:
    rng = np.random.default_rng([seed, 0x7E3, class_index])
    base = CLASS_NAMES[class_index % len(CLASS_NAMES)]
    name = base if class_index < len(CLASS_NAMES) else f"{base}{class_index // len(CLASS_NAMES) + 1}"
    wnid = f"n{FIRST_WNID + class_index:08d}"

    hue0 = rng.random()
    hues = [(hue0 + k / parts_per_class) % 1.0 for k in range(parts_per_class)]
    names = ["body"] + [PART_NAMES[i] for i in sorted(rng.choice(len(PART_NAMES), parts_per_class - 1,
                                                                 replace=False))]
    body_radii = (rng.uniform(0.45, 0.6), rng.uniform(0.25, 0.4))
    parts = [_part(rng, names[0], rng.choice(["ellipse", "box"]), (0.0, 0.0), body_radii, 0.0, hues[0])]
    others = parts_per_class - 1
    start = rng.uniform(0, 2 * math.pi)
    for k in range(others):
        phi = start + 2 * math.pi * k / others + rng.uniform(-0.25, 0.25) * math.pi / others
        edge = (body_radii[0] * math.cos(phi), body_radii[1] * math.sin(phi))
        direction = math.atan2(edge[1], edge[0])
        radii = (rng.uniform(0.14, 0.28), rng.uniform(0.08, 0.16))
        reach = 0.6 * radii[0]  # overlaps the body a little, as real parts are attached
        center = (edge[0] + reach * math.cos(direction), edge[1] + reach * math.sin(direction))
        parts.append(_part(rng, names[k + 1], str(rng.choice(SHAPES)), center, radii, direction, hues[k + 1]))
    return ClassTemplate(wnid=wnid, name=name, parts=tuple(parts))


def _part(rng: np.random.Generator, name: str, shape: str, center, radii, angle: float, hue: float) -> PartTemplate:
    saturation, value = rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)
    color = _hsv(hue, saturation, value)
    color2 = _hsv(hue, saturation * 0.6, value * 0.55)  # same hue, so colour stays the cue
    return PartTemplate(name=name, shape=str(shape), center=(float(center[0]), float(center[1])),
                        radii=(float(radii[0]), float(radii[1])), angle=float(angle), color=color, color2=color2,
                        texture=str(rng.choice(TEXTURES)), period=float(rng.uniform(0.06, 0.14)))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


# --------------------------------------------------------------------------- drawing

def _to_part_frame(u: np.ndarray, v: np.ndarray, part: PartTemplate) -> tuple[np.ndarray, np.ndarray]:
    du, dv = u - part.center[0], v - part.center[1]
    cos, sin = math.cos(part.angle), math.sin(part.angle)
    return cos * du + sin * dv, -sin * du + cos * dv


def _inside(shape: str, pu: np.ndarray, pv: np.ndarray, radii: tuple[float, float]) -> np.ndarray:
    a, b = radii
    if shape == "ellipse":
        return (pu / a) ** 2 + (pv / b) ** 2 <= 1.0
    if shape == "box":
        return (np.abs(pu) <= a) & (np.abs(pv) <= b)
    if shape == "triangle":  # base across the part at -a, tip pointing outwards at +a
        return (pu >= -a) & (np.abs(pv) <= b * (a - pu) / (2 * a))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, pu: np.ndarray, pv: np.ndarray, period: float) -> np.ndarray:
    """True where the second colour shows."""
    if texture == "solid":
        return np.zeros(pu.shape, dtype=bool)
    if texture == "stripes":
        return np.floor(pu / period) % 2 == 1
    if texture == "checker":
        return (np.floor(pu / period) + np.floor(pv / period)) % 2 == 1
    if texture == "dots":
        fu, fv = pu / period - np.round(pu / period), pv / period - np.round(pv / period)
        return fu * fu + fv * fv < 0.09
    raise ValueError(f"unknown texture {texture!r}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation clutter: a tinted base, smooth noise and a few grey-ish shapes."""
    base = np.asarray(_hsv(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.35, 0.85)), np.float64)
    coarse = rng.normal(0.0, 18.0, (5, 5))
    image = base + _upsample(coarse, height, width)[..., None]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    side = min(width, height)
    for _ in range(int(rng.integers(3, 9))):
        shape = str(rng.choice(SHAPES))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radii = (rng.uniform(0.05, 0.25) * side, rng.uniform(0.03, 0.15) * side)
        angle = rng.uniform(0, 2 * math.pi)
        cos, sin = math.cos(angle), math.sin(angle)
        pu, pv = cos * (xs - cx) + sin * (ys - cy), -sin * (xs - cx) + cos * (ys - cy)
        inside = _inside(shape, pu, pv, radii)
        image[inside] = np.asarray(_hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.9)), np.float64)
    return image


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a small grid to (height, width)."""
    gy = np.linspace(0, grid.shape[0] - 1, height)
    gx = np.linspace(0, grid.shape[1] - 1, width)
    rows = np.stack([np.interp(gx, np.arange(grid.shape[1]), row) for row in grid])  # (gh, width)
    return np.stack([np.interp(gy, np.arange(grid.shape[0]), col) for col in rows.T], axis=1)


# --------------------------------------------------------------------------- writing

def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    rle = encode_rle(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": rle,
            "area": int(rle_area(rle)[0]), "bbox": [float(x) for x in rle_to_bbox([rle])[0]], "iscrowd": 0}


def _save(image: np.ndarray, path: Path, image_format: ImageFormat, jpeg_quality: int) -> None:
    pil = Image.fromarray(image)
    if image_format == "JPEG":
        pil.save(path, format="JPEG", quality=jpeg_quality)
    else:
        pil.save(path, format="PNG")


def _write_words(path: Path, templates: list[ClassTemplate]) -> Path:
    """Write ``wnid<TAB>name`` lines, keeping classes another split already listed."""
    names = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            wnid, _, name = line.partition("\t")
            if wnid:
                names[wnid] = name
    names.update((t.wnid, t.name) for t in templates)
    path.write_text("".join(f"{wnid}\t{names[wnid]}\n" for wnid in sorted(names)), encoding="utf-8")
    return path


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, separators=(",", ":")))


# --------------------------------------------------------------------------- disjoint halves

def write_split_halves(out: str | os.PathLike, split: str = "train") -> tuple[Path, Path]:
    """Two disjoint halves of a written split as PartImageNet-format jsons, for the strict protocol
    (match clusters to parts on one half, evaluate on the other) on a dataset with one split.

    ``annotations/<split>_match.json`` takes each class's images 0, 2, 4, ... and
    ``annotations/<split>_eval.json`` images 1, 3, 5, ... (so every class is in both; a
    class needs at least two images), each with its ``objects_`` file. Images keep their
    ids and ``file_name`` (relative to ``<out>/<split>``: read the halves with
    ``image_root=<out>/<split>``), listed round-robin over the classes (the first images of a
    half cover every class). Deterministic: the same split json gives the same bytes.
    """
    ann_dir = Path(out) / "annotations"
    parts = _read_json(ann_dir / f"{split}.json")
    objects = _read_json(ann_dir / f"objects_{split}.json")
    by_class: dict[str, list[dict]] = {}
    for image in sorted(parts["images"], key=lambda im: int(im["id"])):
        by_class.setdefault(str(image.get("wnid") or image["file_name"].split("/")[0]), []).append(image)
    small = [wnid for wnid, images in by_class.items() if len(images) < 2]
    if small:
        raise ValueError(f"{ann_dir / f'{split}.json'}: class {small[0]} has fewer than 2 images; both halves "
                         f"need every class (make the split with images_per_class >= 2)")
    paths = []
    for half, offset in (("match", 0), ("eval", 1)):
        columns = [images[offset::2] for _, images in sorted(by_class.items())]
        chosen = [im for row in range(max(len(c) for c in columns)) for c in columns if row < len(c)
                  for im in [c[row]]]
        ids = {int(im["id"]) for im in chosen}
        info = {**parts.get("info", {}), "split": f"{split}_{half}", "half_of": split}
        for source, name in ((parts, f"{split}_{half}.json"), (objects, f"objects_{split}_{half}.json")):
            _write_json(ann_dir / name, {"info": info, "images": chosen, "categories": source["categories"],
                                         "annotations": [a for a in source["annotations"]
                                                         if int(a["image_id"]) in ids]})
        paths.append(ann_dir / f"{split}_{half}.json")
    return paths[0], paths[1]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
