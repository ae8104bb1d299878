"""How close a build's images stay to the class's few real images (RESULTS.md "Generation levers on tune seeds").

For every image: the mean absolute grey-level difference (0-255) to the nearest of its class's `shots` real
images (drawn with `shots_seed`, the images `generate.init: real` starts from), at the build's size. A
real-anchored build whose images sit at ~0 from a real image made near-copies of the few shots; a text-to-image
build's distance is the scale to compare with. Prints one line per (build, method): mean distance and the share of
images within 10 grey levels of a real image.

    python scripts/experiments/start_distance.py build/lv-base build/lv-base-real-75
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", type=Path, nargs="+")
    parser.add_argument("--near", type=float, default=10.0, help="grey levels that count as a near-copy")
    args = parser.parse_args()

    import yaml
    from PIL import Image

    from synthaug.config import from_dict
    from synthaug.datasets.catalog import get_dataset
    from synthaug.generation import real_start_images
    from synthaug.index import load_index
    from synthaug.shards import ShardReader, decode_image

    for build in args.builds:
        config = from_dict(yaml.safe_load((build / "config.yaml").read_text()))
        gen = config.generate
        rows = load_index(build).to_pylist()
        classes = sorted({r["class_index"] for r in rows})
        starts = real_start_images(get_dataset(config.dataset, config.root, config.split), gen, classes)
        grey = {c: np.stack([np.asarray(im.convert("L").resize((gen.width, gen.height), Image.Resampling.BICUBIC),
                                        dtype=np.float32) for im in starts[c].values()]) for c in classes}
        if build == args.builds[0]:  # the scale: other real images of the class (up to 50, not the shots)
            dataset = get_dataset(config.dataset, config.root, config.split)
            d = []
            for c in classes:
                others = [i for i, t in enumerate(dataset.targets) if int(t) == c and i not in starts[c]][:50]
                for i in others:
                    im = dataset[i][0].convert("L").resize((gen.width, gen.height), Image.Resampling.BICUBIC)
                    d.append(float(np.abs(grey[c] - np.asarray(im, dtype=np.float32)).mean((1, 2)).min()))
            d = np.array(d)
            print(f"real images (not the shots): mean distance to the nearest real shot {d.mean():.1f} grey levels, "
                  f"{100 * (d <= args.near).mean():.0f}% within {args.near:g} ({len(d)} images)")
        reader = ShardReader(build)
        by_method: dict[str, list[float]] = {}
        for r in rows:
            data = reader.read(shard=r["shard"], offset=r["offset"], size=r["size"], sha256=None)
            x = np.asarray(decode_image(data, mode="L", image_format=r["image_format"]), dtype=np.float32)
            by_method.setdefault(r["method"], []).append(float(np.abs(grey[r["class_index"]] - x).mean((1, 2)).min()))
        for method, d in sorted(by_method.items()):
            d = np.array(d)
            print(f"{build.name} {method}: mean distance to the nearest real shot {d.mean():.1f} grey levels, "
                  f"{100 * (d <= args.near).mean():.0f}% within {args.near:g} ({len(d)} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
