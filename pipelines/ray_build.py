"""Ray job entry point: build a synthetic training set on a Ray cluster, from the public API only.

Submit it from the repository root (the working dir travels with the job; every node needs synthaug installed, or
add ``--runtime-env-json '{"pip": ["synthaug[ray]"]}'``)::

    ray job submit --working-dir . -- python pipelines/ray_build.py --config configs/cub.yaml \
        --set root=/data/CUB_200_2011 --set out=/shared/out/cub

``ray job submit`` sets ``RAY_ADDRESS`` for this driver, so the build attaches to the job's cluster: one actor per
GPU, each loading the models once. ``out`` must be on storage every node can write (NFS, a mounted bucket): actors
write their shards there directly. Re-submitting the same command resumes an interrupted build.

Run locally (starts, and stops, its own Ray)::

    python pipelines/ray_build.py --config configs/digits.yaml --set per_class=10

Exit status: 0 done, 1 some class jobs failed every retry (see ``out/failures.json``), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from synthaug.builder.driver import BuildFailed, build
from synthaug.cli import configure_logging
from synthaug.config import load_config, parse_overrides
from synthaug.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml); keys are BuildConfig fields")
    parser.add_argument("--preset", help="named override set applied first, e.g. 'paper'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for sections: --set dct.lr=0.001 --set per_class=10")
    parser.add_argument("--ray-address", help="attach to this cluster ('auto' or host:port); default: RAY_ADDRESS "
                                              "when run by `ray job submit`, else a local Ray")
    parser.add_argument("--executor", choices=["ray", "local"], default="ray")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing build made with another config")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    configure_logging(timestamps=True)
    try:
        overrides = parse_overrides(args.overrides)
        overrides["run.executor"] = args.executor
        if args.ray_address:
            overrides["run.ray_address"] = args.ray_address
        config = load_config(args.config, overrides, preset=args.preset)
        result = build(config, overwrite=args.overwrite, progress=not args.quiet)
    except UserError as e:
        print(f"ray_build: error: {e}", file=sys.stderr)
        return 2
    except BuildFailed as e:
        print(e.result.summary(), file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
