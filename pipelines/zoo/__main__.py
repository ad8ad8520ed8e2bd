"""``python -m pipelines.zoo [--root DIR] [--force] [--only NAME ...]``: build the offline tiny model zoo."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipelines.zoo import ZOO_COMPONENTS, build_zoo, component_stats, zoo_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.zoo", description=__doc__)
    parser.add_argument("--root", type=Path, default=None, help="zoo directory (default: $PREFMILL_ZOO or <repo>/.zoo)")
    parser.add_argument("--force", action="store_true", help="rebuild components even when complete")
    parser.add_argument("--only", nargs="+", choices=ZOO_COMPONENTS, default=None, help="build only these components")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the zoo never downloads

    root = (args.root or zoo_root()).resolve()
    names = args.only or list(ZOO_COMPONENTS)
    for name in names:  # one at a time, so each line appears as soon as its component is ready
        started = time.time()
        path = build_zoo(root, force=args.force, only=[name])[name]
        stats = component_stats(path)
        print(f"{name:6s} {path}  params={stats['parameters']:,}  size={stats['bytes'] / 2**20:.1f} MiB  "
              f"({time.time() - started:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
