"""The accelerator's memory: how much CUDA memory is free, and the largest batch that fits in it.

Consumes a device (and the per-item and fixed costs a caller measured) and produces a byte count or a batch size.
Below both `synthaug.generation` (images per batch) and `synthaug.tokens` (classes per DCT batch), which ask the same
two questions; torch is imported when the free memory is read, so the arithmetic needs none.

`free_cuda_memory` counts the caching allocator's unused share as free; `auto_batch_size` turns it into a batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AUTO_MEMORY_FRACTION = 0.9  # of the free memory: the rest is headroom for the guide, fragmentation, other processes


AUTO_MAX_BATCH = 64  # past this a GPU is long saturated; larger batches only delay the first shard


def auto_batch_size(free_bytes: float, per_image_bytes: float, fixed_bytes: float = 0.0, *,
                    fraction: float = AUTO_MEMORY_FRACTION, max_batch: int = AUTO_MAX_BATCH) -> int:
    """The largest batch whose generation memory fits in `fraction` of `free_bytes` (1 at least, `max_batch` at most).

    A batch of ``n`` images needs ``fixed_bytes + n * per_image_bytes`` beyond the loaded weights
    (`synthaug.generation.probe_memory`).

    >>> auto_batch_size(free_bytes=40e9, per_image_bytes=2e9, fixed_bytes=1e9)
    17
    """
    if not per_image_bytes > 0:
        raise ValueError(f"per_image_bytes must be > 0 but is {per_image_bytes!r}")
    n = int((free_bytes * fraction - fixed_bytes) // per_image_bytes)
    return max(1, min(max_batch, n))


def free_cuda_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device, counting what PyTorch's caching allocator holds but does not use (ours to reuse)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


__all__ = ["AUTO_MAX_BATCH", "AUTO_MEMORY_FRACTION", "auto_batch_size", "free_cuda_memory"]
