"""A class job's images into its shards: generated batch by batch at the pipeline's pace, encoded and written on a
`synthaug.shards.ShardWriter` thread (`ClassImages`, one per worker).

Once per worker it resolves ``generate.batch_size`` (auto: from free CUDA memory) and, with ``generate.compile``
(auto: on CUDA), compiles the UNet for the batch sizes the shards use. With ``generate.keep_confidence`` a shard holds
the first images from its start seed on whose guide probability passes the threshold, batches lying on a fixed grid
of seed indices, so a resumed shard is made by exactly the batches an uninterrupted build ran.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from ..config import BuildConfig
from ..generation import batch_size_for, batch_sizes, compile_unet, compiles, generate, use_unet
from ..layout import pending_shards, shard_paths
from ..shards import ShardWriter
from .plan import ClassJob, ShardTask

logger = logging.getLogger(__name__)


class ClassImages:
    """Writes the unfinished shards of class jobs, keeping what one worker resolves once (the batch size, the
    compiled UNet) for its next jobs.

    Args:
        out: the build directory.
        config: the build config.
        report: called with progress events (``"images"``, ``"shard"``, ``"compile"``).
        hook: called as ``hook("on_shard_written", job, shard_id)`` once a shard is complete on disk.
        overlap_writes: encode and write batch i's images on a background thread while batch i+1 generates; False
            writes them in line (the same bytes).
    """

    def __init__(self, out: Path, config: BuildConfig, *, report: Callable[[dict], None],
                 hook: Callable[..., None], overlap_writes: bool = True) -> None:
        self.out, self.config, self.report, self.hook = out, config, report, hook
        self.overlap_writes = overlap_writes
        self._generate: Any = None  # the generate config with its batch size resolved, set on the first shard
        self._unet: Any = None  # the compiled UNet with generate.compile

    def close(self) -> None:
        self._generate = self._unet = None

    def write(self, job: ClassJob, models: dict[str, Any], *, plain: bool = False) -> dict[str, Any]:
        """Generate and write every unfinished shard of the job, batch by batch (`plain`: the token's shards with
        the plain prompt, a distrusted token's fallback).

        The images of batch i are encoded and written on the `ShardWriter`'s thread while batch i+1 generates. A
        shard's progress event and ``on_shard_written`` hook come once it is complete on disk, and always before the
        next shard can complete (so a job stopped in that hook leaves exactly the shards reported so far).
        """
        c = job.class_index
        pending = pending_shards(self.out, job)
        stats: dict[str, Any] = {"shards_written": [], "images": 0, "batch_size": None, "compile_seconds": 0.0,
                                 "generate_seconds": 0.0, "write_seconds": 0.0, "write_wait_seconds": 0.0}
        if not pending:
            return stats
        pipe = models["pipe"]
        if self._generate is None:
            stats["compile_seconds"] = self._prepare_generation(pipe, pending, c)
        gen = self._generate
        sizes = {t.shard_id: t.size for t in pending}

        def on_disk(done: list) -> None:
            for shard_id, _ in done:
                stats["shards_written"].append(shard_id)
                stats["images"] += sizes[shard_id]
                self.report({"kind": "shard", "class_index": c, "shard": shard_id, "images": sizes[shard_id]})
                self.hook("on_shard_written", job, shard_id)

        t0 = time.perf_counter()
        shards = self.config.shards
        # on a GPU, PNG encoding of a fast batch needs a few cores to keep up; on CPUs, torch holds the cores
        encoders = min(4, os.cpu_count() or 1) if pipe.device.type == "cuda" else 1
        with ShardWriter(self.out, image_format=shards.image_format, quality=shards.quality,
                         background=self.overlap_writes, encode_threads=encoders) as writer, use_unet(pipe, self._unet):
            next_seed: dict[str, int] = {}  # keep_confidence: the seed index each method's next shard starts at
            for task in pending:
                writer.begin(task.shard_id)
                token = None if task.method == "sd" or plain else job.token
                make = partial(generate, pipe, class_index=c, label=job.name, token=token, config=gen,
                               method=task.method, classifier=models["guide"],
                               init_images=models.get("init_images", {}).get(c))
                batches = (self._all_images(task, make, gen.batch_size) if gen.keep_confidence is None else
                           self._kept_images(job, task, make, gen, next_seed))
                for images, done in batches:
                    writer.put(images)
                    self.report({"kind": "images", "class_index": c, "shard": task.shard_id, "done": done})
                    on_disk(writer.finished())
                on_disk(writer.drain())  # the previous shard: its hook runs before this one can complete
                writer.end()
            on_disk(writer.drain())
        stats.update(batch_size=gen.batch_size, generate_seconds=time.perf_counter() - t0,
                     write_seconds=writer.write_seconds, write_wait_seconds=writer.wait_seconds)
        return stats

    @staticmethod
    def _all_images(task: ShardTask, make: Callable, batch_size: int) -> Iterator[tuple[list, int]]:
        """Every image of the shard, batch by batch; batches start at the shard's first index, exactly as
        `generate` would split the whole range itself."""
        for lo in range(task.start, task.stop, batch_size):
            hi = min(lo + batch_size, task.stop)
            yield make(indices=range(lo, hi)), hi - task.start

    def _kept_images(self, job: ClassJob, task: ShardTask, make: Callable, gen: Any,
                     next_seed: dict[str, int]) -> Iterator[tuple[list, int]]:
        """``generate.keep_confidence``: the shard's images, the first ones from its start seed on whose guide
        probability passes the threshold (past ``generate.max_attempts`` seeds, any). Batches lie on a fixed grid
        of seed indices, so a resumed shard generates exactly the batches an uninterrupted build did (the images
        before its start seed are made again and dropped)."""
        threshold, size = gen.keep_confidence, gen.batch_size
        limit = gen.max_attempts or 10 * self.config.per_class
        first = next_seed.get(task.method)
        if first is None:
            first = 0 if task.chunk == 0 else self._seed_after(job, task)
        kept, below, lo = 0, 0, first - first % size
        while kept < task.size:
            images = [im for im in make(indices=range(lo, lo + size)) if im.index >= first
                      and (im.index >= limit or (im.guide_prob is not None and im.guide_prob >= threshold))]
            images = images[: task.size - kept]
            below += sum(im.index >= limit and (im.guide_prob is None or im.guide_prob < threshold) for im in images)
            if images:
                kept += len(images)
                next_seed[task.method] = images[-1].index + 1
                yield images, kept
            lo += size
        if below:
            logger.warning("class %d (%s, %s): %d image(s) of shard %d kept below generate.keep_confidence %g after "
                           "%d seeds (generate.max_attempts)", job.class_index, job.name, task.method, below,
                           task.shard_id, threshold, limit)

    def _seed_after(self, job: ClassJob, task: ShardTask) -> int:
        """The seed index after the last image of the previous shard of the same method (finished on disk)."""
        import pyarrow.parquet as pq

        before = next(t for t in job.shards if t.method == task.method and t.chunk == task.chunk - 1)
        column = pq.read_table(shard_paths(self.out, before.shard_id, before.method).parquet,
                               columns=["index"]).column("index")
        return int(max(column.to_pylist())) + 1

    def _prepare_generation(self, pipe: Any, pending: Sequence[ShardTask], class_index: int) -> float:
        """Once per worker: resolve ``generate.batch_size`` (auto: from free memory on CUDA) and, with
        ``generate.compile`` (auto: on CUDA), compile the UNet for the batch sizes the shards use. Returns the compile
        seconds."""
        gen = self.config.generate
        gen = replace(gen, batch_size=batch_size_for(pipe, gen))
        seconds = 0.0
        if compiles(pipe, gen):
            sizes = sorted({n for t in pending for n in batch_sizes(t.start, t.stop, gen.batch_size)}, reverse=True)
            self._unet, seconds = compile_unet(pipe, gen, sizes)
            logger.info("generate.compile: UNet compiled for batch sizes %s in %.1f s", sizes, seconds)
            self.report({"kind": "compile", "class_index": class_index, "seconds": seconds})
        self._generate = gen
        return seconds
