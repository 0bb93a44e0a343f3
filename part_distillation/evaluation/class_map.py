"""Which of a PartDistillation model's object classes scores a dataset's object class.

A PartDistillation model segments parts of one of its training classes (ImageNet leaf
synsets), and must be told which. PartImageNet images carry their ImageNet class, but
Pascal-Part and Cityscapes-Part classes map to inner WordNet synsets (dog n02084071,
cat, person, car...) that are no ImageNet-1k class, so an exact look-up finds nothing
for an ImageNet-1k model. The rule, in order:

1. a user's mapping file (``stage.class_map_file``), json ``{"dog": "n02085620", ...}``
   or csv/tsv lines ``dog,n02085620``; the key is the dataset's class name or its wnid,
   the value a wnid of one of the model's classes;
2. the sample's synset itself, when it is a class of the model (PartImageNet, a 21k model);
3. the model's classes under that synset in the WordNet hierarchy (``stage.wordnet_is_a``:
   ImageNet's ``wordnet.is_a.txt``, ``parent child`` wnids per line): the first of them
   in the model's class order (the lowest head index).

One fixed class per dataset class, not a choice per image: the part clusters of two
ImageNet classes are unrelated (cluster 3 of one breed is not cluster 3 of another), and
the mIoU's majority vote pools every object of the dataset class, so one head keeps the
clusters consistent. The rule uses no ground truth at all (not even the object mask).
Without a mapping file or hierarchy, or when the synset has no class of the model under
it, the sample is skipped (``object_class_not_in_model``) and counted in ``metrics.md``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import deque
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from part_distillation.config import ConfigError

PathLike = str | os.PathLike


def read_class_map(path: PathLike, setting: str = "stage.class_map_file") -> dict[str, str]:
    """``dataset class or wnid -> model wnid`` from a json object or a two-column csv/tsv file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{setting}={path} does not exist: give a json or csv file of dataset class -> model wnid")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{setting}={path} is not valid json ({err.msg}, line {err.lineno})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConfigError(f"{setting}={path}: expected a json object of dataset class -> model wnid (strings)")
        return {str(k): v.strip() for k, v in data.items()}
    delimiter = "\t" if "\t" in text else ","
    out = {}
    for number, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), 1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2 or not row[1].strip():
            raise ConfigError(f"{setting}={path}:{number}: expected 'dataset class{delimiter}model wnid'")
        out[row[0].strip()] = row[1].strip()
    return out


def read_hierarchy(path: PathLike, setting: str = "stage.wordnet_is_a") -> dict[str, list[str]]:
    """``parent -> children`` from WordNet is-a lines ``parent child`` (ImageNet's ``wordnet.is_a.txt``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{setting}={path} does not exist: give ImageNet's wordnet.is_a.txt "
                          f"('parent child' wnids per line), or set it to null")
    children: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2:
            raise ConfigError(f"{setting}={path}:{number}: expected 'parent child' wnids, got {line.strip()!r}")
        children.setdefault(parts[0], []).append(parts[1])
    return children


def hyponyms(wnid: str, children: Mapping[str, Sequence[str]]) -> set[str]:
    """Every synset under ``wnid`` (not itself)."""
    seen: set[str] = set()
    todo = deque(children.get(wnid, ()))
    while todo:
        node = todo.popleft()
        if node not in seen:
            seen.add(node)
            todo.extend(children.get(node, ()))
    return seen


class ModelClassRule:
    """The model class index of a sample's object class (see the module notes), cached per class."""

    def __init__(self, class_wnids: Sequence[str] | None, mapping: Mapping[str, str] | None = None,
                 hierarchy: Mapping[str, Sequence[str]] | None = None, source: str = "stage.class_map_file"):
        self.class_wnids = tuple(class_wnids) if class_wnids is not None else None
        self.mapping = dict(mapping or {})
        self.hierarchy = hierarchy
        self._index = {w: i for i, w in enumerate(self.class_wnids or ())}
        if self.class_wnids is not None:
            unknown = sorted({v for v in self.mapping.values() if v not in self._index})
            if unknown:
                raise ConfigError(f"{source}: {unknown[:3]} {'are' if len(unknown) > 1 else 'is'} not a class of the "
                                  f"model ({len(self.class_wnids)} classes): map to the model's wnids")
        self._cache: dict[tuple[str | None, str | None], int | None] = {}

    @classmethod
    def from_files(cls, class_wnids: Sequence[str] | None, class_map_file: PathLike | None = None,
                   wordnet_is_a: PathLike | None = None) -> "ModelClassRule":
        mapping = read_class_map(class_map_file) if class_map_file else None
        hierarchy = read_hierarchy(wordnet_is_a) if wordnet_is_a else None
        return cls(class_wnids, mapping, hierarchy, source=f"stage.class_map_file={class_map_file}")

    def index(self, object_class: str | None, wnid: str | None) -> int | None:
        """The head index for a sample of ``object_class`` (the dataset's name) and synset ``wnid``;
        None: no class of the model stands for it."""
        key = (object_class, wnid)
        if key not in self._cache:
            self._cache[key] = self._resolve(object_class, wnid)
        return self._cache[key]

    def _resolve(self, object_class: str | None, wnid: str | None) -> int | None:
        if self.class_wnids is None:
            return None
        for name in (object_class, wnid):
            if name is not None and name in self.mapping:
                return self._index[self.mapping[name]]
        if wnid is None:
            return None
        if wnid in self._index:
            return self._index[wnid]
        if self.hierarchy is not None:
            under = [self._index[w] for w in hyponyms(wnid, self.hierarchy) if w in self._index]
            if under:
                return min(under)
        return None


def describe(rule: ModelClassRule, samples: Iterable[tuple[str, str | None]]) -> dict[str, str | None]:
    """``dataset class -> model wnid`` (None: skipped) for the (class, wnid) pairs given, for the log."""
    out = {}
    for name, wnid in samples:
        index = rule.index(name, wnid)
        out[name] = None if index is None else rule.class_wnids[index]
    return out


__all__ = ["ModelClassRule", "describe", "hyponyms", "read_class_map", "read_hierarchy"]
