"""CLIP vocabularies: Detic .npy files, the prompt, encoding with a tiny offline CLIP, the cache."""
from __future__ import annotations

import os
import stat
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from part_distillation.models.vocabulary import (
    cached_vocabulary,
    encode_class_names,
    load_vocabulary,
    prompts_for,
    vocabulary_key,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def tiny_clip():
    """A randomly initialised CLIP text tower (512-wide projection) and a tokenizer built offline."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab["ca"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("c", "a")])
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config).eval()
    return model, tokenizer


@pytest.mark.reference
def test_load_detic_vocabulary(reference_models: Path):
    vocab = load_vocabulary(reference_models / "detic_tiny_vocab.npy")
    assert vocab.shape == (5, 512) and vocab.dtype == np.float32
    assert np.allclose(np.linalg.norm(vocab, axis=1), 1, atol=1e-3)


def test_wrong_width_says_expected_width(tmp_path: Path):
    np.save(tmp_path / "v.npy", np.zeros((4, 768), np.float16))
    with pytest.raises(ValueError, match="width 768, expected 512"):
        load_vocabulary(tmp_path / "v.npy")
    np.save(tmp_path / "flat.npy", np.zeros(512))
    with pytest.raises(ValueError, match="shape"):
        load_vocabulary(tmp_path / "flat.npy")


def test_prompt_is_upstream_a_name():
    assert prompts_for(["tench", "great white shark"]) == ["a tench", "a great white shark"]


def projected_eos(model, token_ids: list[int]) -> np.ndarray:
    """CLIP's encode_text by hand for one unpadded sentence: the text tower's final
    (layer-normed) hidden state at the end-of-text token, times the projection matrix."""
    with torch.no_grad():
        hidden = model.text_model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]
        return (hidden[len(token_ids) - 1] @ model.text_projection.weight.T).numpy()


def hand_tokens(prompt: str) -> list[int]:
    """Token ids of a prompt in tiny_clip's vocabulary, worked out by hand: letters are
    0-25, a word's last letter is letter + 26, "ca" is 52, start 53, end 54."""
    ids = [53]
    for word in prompt.split():
        pieces = [52] + [ord(c) - 97 for c in word[2:]] if word.startswith("ca") else [ord(c) - 97 for c in word]
        pieces[-1] = pieces[-1] + 26 if pieces[-1] < 26 else pieces[-1]
        ids += pieces
    return ids + [54]


def test_hand_tokens_are_the_tokenizers(tiny_clip):
    _, tokenizer = tiny_clip
    assert hand_tokens("a dog") == [53, 26, 3, 14, 32, 54]
    for prompt in ("a dog", "a bird", "a cab"):
        assert tokenizer(prompt)["input_ids"] == hand_tokens(prompt)


def test_encode_uses_projected_eos_feature_of_prompt(tiny_clip):
    model, tokenizer = tiny_clip
    emb = encode_class_names(["cat", "dog", "bird"], model, tokenizer)  # padded to "a bird"
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    for row, prompt in enumerate(["a cat", "a dog", "a bird"]):
        assert np.allclose(emb[row], projected_eos(model, hand_tokens(prompt)), atol=1e-5), prompt
    assert not np.allclose(emb[0], emb[1])
    assert np.allclose(encode_class_names(["dog"], model, tokenizer, batch_size=1)[0], emb[1], atol=1e-5)


def test_model_without_projection_is_refused(tiny_clip):
    from transformers import CLIPTextModel

    _, tokenizer = tiny_clip
    bare = CLIPTextModel(tiny_clip[0].config)
    with pytest.raises(TypeError, match="projection"):
        encode_class_names(["cat"], bare, tokenizer)


def test_cache_computes_once_per_vocabulary(tmp_path: Path, tiny_clip):
    model, tokenizer = tiny_clip
    calls = []

    class CountingEncoder:
        """Stands in for CLIP: counts the sentences it encodes."""

        text_projection = True

        def __call__(self, input_ids, attention_mask):
            calls.append(len(input_ids))
            return type("Out", (), {"text_embeds": model(input_ids=input_ids, attention_mask=attention_mask).text_embeds})

    cache = tmp_path / "cache"
    names = ["cat", "dog"]
    first = cached_vocabulary(names, cache, CountingEncoder(), tokenizer, model_id="tiny")
    again = cached_vocabulary(names, cache, CountingEncoder(), tokenizer, model_id="tiny")
    assert calls == [2] and np.array_equal(first, again)
    assert [p.name for p in cache.iterdir()] == [f"clip_{vocabulary_key(names, 'tiny')}.npy"]
    cached_vocabulary(names, cache, CountingEncoder(), tokenizer, model_id="other")  # other model: new entry
    cached_vocabulary(["dog", "cat"], cache, CountingEncoder(), tokenizer, model_id="tiny")  # order matters
    assert calls == [2, 2, 2] and len(list(cache.iterdir())) == 3
    assert vocabulary_key(names, "tiny", "a photo of a {}") != vocabulary_key(names, "tiny")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_file_mode_follows_the_umask(tmp_path: Path, tiny_clip, umask):
    """The cache is shared by every job of a team: 0o666 & ~umask (0644 / 0664), as ``open``
    creates files, not mkstemp's 0600; and no temporary file is left behind."""
    model, tokenizer = tiny_clip
    old = os.umask(umask)
    try:
        cached_vocabulary(["cat"], tmp_path / "cache", model, tokenizer, model_id="tiny")
    finally:
        os.umask(old)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o666 & ~umask


def test_cache_from_local_model_directory(tmp_path: Path, tiny_clip):
    model, tokenizer = tiny_clip
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    emb = cached_vocabulary(["cat"], tmp_path / "cache", tmp_path / "clip")
    assert np.allclose(emb[0], projected_eos(model, hand_tokens("a cat")), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not found"):
        encode_class_names(["cat"], tmp_path / "missing")
