"""How mixed are streamed batches? A build's own shards (one class of one method each) against the class-mixed shards
of ``synthaug export --format webdataset``, read the way a training loop streams them: webdataset's shard shuffle
and a sample shuffle buffer (default 0: none), in batches.

    python scripts/experiments/stream_mixing.py out/digits/shards/dct-*.tar
    python scripts/experiments/stream_mixing.py out/digits/export/webdataset/train-*.tar --buffer 100

Prints, per run: the batches, how many hold a single class, and the mean number of classes per batch.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence


def mixing(urls: Sequence[str], *, batch: int, buffer: int, seed: int) -> dict[str, float]:
    import webdataset as wds

    ds = wds.WebDataset(list(urls), shardshuffle=len(urls), seed=seed)
    if buffer:
        ds = ds.shuffle(buffer, rng=random.Random(seed))
    labels = [int(s["cls"]) for s in ds]
    batches = [labels[i : i + batch] for i in range(0, len(labels) - batch + 1, batch)]
    return {"samples": len(labels), "batches": len(batches),
            "single_class": sum(len(set(b)) == 1 for b in batches),
            "mean_classes": sum(len(set(b)) for b in batches) / max(len(batches), 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tars", nargs="+", help="the shard files to stream")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--buffer", type=int, default=0, help="webdataset's sample shuffle buffer (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = mixing(sorted(args.tars), batch=args.batch, buffer=args.buffer, seed=args.seed)
    print(f"{len(args.tars)} tars, {r['samples']} samples, batch {args.batch}, buffer {args.buffer}: "
          f"{r['single_class']} of {r['batches']} batches hold a single class; {r['mean_classes']:.2f} classes per "
          f"batch on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
