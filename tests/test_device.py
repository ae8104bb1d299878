"""The accelerator's memory: the batch that fits in free CUDA memory, and the free memory itself."""

from __future__ import annotations

import pytest
import torch

from synthaug import device
from synthaug.device import auto_batch_size, free_cuda_memory


def test_auto_batch_size_arithmetic():
    gib = 2**30
    # 0.9 x 40 GiB = 36 GiB; minus 1 GiB fixed = 35 GiB; at 2 GiB per image: 17 images
    assert auto_batch_size(40 * gib, 2 * gib, 1 * gib) == 17
    assert auto_batch_size(40 * gib, 2 * gib, 1 * gib, fraction=1.0) == 19
    assert auto_batch_size(1 * gib, 2 * gib) == 1  # never below one image: a too-small GPU fails loudly in the pipe
    assert auto_batch_size(1000 * gib, 0.01 * gib) == device.AUTO_MAX_BATCH
    with pytest.raises(ValueError, match="per_image_bytes must be > 0"):
        auto_batch_size(gib, 0)


def test_free_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (3 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 2 * gib)
    assert free_cuda_memory(torch.device("cuda:0")) == 6 * gib  # 3 free + (5 reserved - 2 in use)
