"""CLIP text-embedding vocabularies for Detic's zero-shot classifier.

A vocabulary is a float32 (C, D) array, one CLIP text embedding per class (D = 512 for the
ViT-B/32 text tower Detic was trained with), the layout of Detic's ``*_clip_a+cname.npy`` files.
It is either read from such a file or computed from class names with the prompt Detic used
("a {name}"); computed vocabularies are cached on disk, keyed by the names, prompt and model.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from part_distillation.store.files import atomic_write_bytes

CLIP_EMBED_DIM = 512
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_PROMPT = "a {}"


def load_vocabulary(path: str | Path, expected_dim: int = CLIP_EMBED_DIM) -> np.ndarray:
    """Read a Detic-style ``.npy`` of class embeddings as float32 (C, D), checking the width."""
    array = np.load(Path(path), allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"{path}: a vocabulary must be a (classes, {expected_dim}) array, got shape {array.shape}")
    if array.shape[1] != expected_dim:
        raise ValueError(
            f"{path}: embeddings have width {array.shape[1]}, expected {expected_dim} "
            f"(the CLIP text width Detic's classifier was trained with)"
        )
    return array.astype(np.float32)


def prompts_for(names: Sequence[str], template: str = DEFAULT_PROMPT) -> list[str]:
    """Upstream Detic's sentences: ``"a " + name`` by default."""
    return [template.format(name) for name in names]


def _model_id(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def _load_clip(model: str | Path, tokenizer: Any | None) -> tuple[Any, Any]:
    """Load the text tower (with its projection) and tokenizer from a local directory only."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"CLIP model directory {path} not found; pass a loaded model, or save "
            f"{DEFAULT_CLIP_MODEL} (model and tokenizer) there with save_pretrained"
        )
    text_model = CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True)
    if tokenizer is None:
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    return text_model, tokenizer


def _text_features(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Projected EOS features, as CLIP's ``encode_text`` (the projection is part of the embedding)."""
    if hasattr(model, "get_text_features"):  # CLIPModel
        out = model.get_text_features(**inputs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    if hasattr(model, "text_projection"):  # CLIPTextModelWithProjection
        return model(**inputs).text_embeds
    if hasattr(model, "encode_text"):  # OpenAI-CLIP-like objects
        return model.encode_text(inputs["input_ids"])
    raise TypeError(
        f"{type(model).__name__} has no text projection; use CLIPTextModelWithProjection or CLIPModel "
        "(Detic's embeddings are CLIP encode_text outputs, i.e. after the projection)"
    )


@torch.no_grad()
def encode_class_names(
    names: Sequence[str],
    model: Any,
    tokenizer: Any | None = None,
    template: str = DEFAULT_PROMPT,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """CLIP text embeddings (C, D) float32 for class names, prompted as upstream Detic.

    ``model`` is a CLIPTextModelWithProjection / CLIPModel object, or a local directory holding one
    (never downloaded here); ``tokenizer`` defaults to the one saved with a directory model.
    """
    if isinstance(model, (str, Path)):
        model, tokenizer = _load_clip(model, tokenizer)
    if tokenizer is None:
        raise ValueError("a tokenizer is required when the CLIP model is passed as an object")
    if hasattr(model, "eval"):
        model.eval()
    if device is None:
        params = getattr(model, "parameters", None)
        device = next(params()).device if params is not None else torch.device("cpu")
    sentences = prompts_for(names, template)
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        chunks.append(_text_features(model, inputs).float().cpu())
    if not chunks:
        raise ValueError("no class names given")
    return torch.cat(chunks).numpy().astype(np.float32)


def vocabulary_key(names: Sequence[str], model_id: str, template: str = DEFAULT_PROMPT) -> str:
    """Hash identifying a computed vocabulary: the ordered names, the prompt and the model id."""
    payload = json.dumps({"names": list(names), "model": model_id, "template": template}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def cached_vocabulary(
    names: Sequence[str],
    cache_dir: str | Path,
    model: Any = DEFAULT_CLIP_MODEL,
    tokenizer: Any | None = None,
    model_id: str | None = None,
    template: str = DEFAULT_PROMPT,
    expected_dim: int = CLIP_EMBED_DIM,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Embeddings for ``names``, computed once per (names, prompt, model) and kept in ``cache_dir``.

    ``model_id`` names the model in the cache key; by default it is the directory path or the
    loaded model's ``name_or_path``.
    """
    model_id = model_id or _model_id(model)
    if not model_id:
        raise ValueError("cannot identify the CLIP model for the cache key; pass model_id")
    path = Path(cache_dir) / f"clip_{vocabulary_key(names, model_id, template)}.npy"
    if path.is_file():
        array = load_vocabulary(path, expected_dim)
        if len(array) == len(names):
            return array
    array = encode_class_names(names, model, tokenizer, template, device=device)
    if array.shape[1] != expected_dim:
        raise ValueError(f"the CLIP model gives {array.shape[1]}-wide embeddings, expected {expected_dim}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array)
    # atomic (parallel jobs never read a half-written cache), mode 0o666 & ~umask as the store's
    # files (mkstemp's 0600 would hide the cache from teammates sharing it)
    atomic_write_bytes(path, buffer.getvalue())
    return array


def class_vocabulary(names: Sequence[str], file: str | None, cache: str, clip_model: str) -> np.ndarray:
    """(C, 512) CLIP embeddings of ``"a " + name`` for every class ``names``, in class order: read
    from ``file`` (``stage.vocabulary``), or computed once with the local CLIP model ``clip_model``
    and cached in ``cache`` (an atomic file every job of the array reuses)."""
    if file:
        array = load_vocabulary(file)
        if len(array) != len(names):
            raise ValueError(f"{file} holds {len(array)} class embeddings, the dataset has "
                             f"{len(names)} classes (one per class, in class order)")
        return array
    return cached_vocabulary(list(names), cache, model=clip_model)
