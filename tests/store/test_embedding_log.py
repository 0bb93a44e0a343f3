"""The embedding files of stage 5's cluster pass and their crash-recovery log."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from part_distillation.store.embedding_log import EmbeddingFile, EmbeddingLog
from part_distillation.store.errors import ConfigMismatchError


def test_embedding_file_appends_truncates_and_maps(tmp_path):
    f = EmbeddingFile(tmp_path / "c.f32", 3)
    assert len(f) == 0 and f.read().shape == (0, 3)
    end = f.append(np.ones((2, 3)))
    assert end == 24
    f.append(torch.zeros(1, 3))
    assert len(f) == 3
    f.truncate(end)
    np.testing.assert_array_equal(f.read(), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        f.append(np.ones((2, 4)))


def test_the_log_cuts_back_a_torn_write_and_refuses_another_owner(tmp_path):
    log = EmbeddingLog(tmp_path / "w", "model_a.pth")
    log.add("k1", 3, np.ones((2, 4), np.float32))
    log.add("k2", 5, torch.zeros(0, 0))  # an unreadable image: logged, nothing appended
    with open(tmp_path / "w" / "class_3.f32", "ab") as f:  # a kill mid-append: rows without a log line
        f.write(b"\0" * 22)
    with open(tmp_path / "w" / "progress.tsv", "a") as f:
        f.write("k3\t3\t")  # and a torn log line
    again = EmbeddingLog(tmp_path / "w", "model_a.pth")
    assert again.done == {"k1", "k2"} and again.lengths == {3: 32, 5: 0} and again.dim == 4
    np.testing.assert_array_equal(again.file(3, 4).read(), np.ones((2, 4), np.float32))
    with pytest.raises(ConfigMismatchError, match="made with checkpoint model_a.pth, this run uses model_b.pth"):
        EmbeddingLog(tmp_path / "w", "model_b.pth")
