"""A deliberately learnable subject for subject-driven RPO (``trainers.rpo``): one distinctive object of the
proving ground's world (:mod:`pipelines.proving_world`), a large purple triangle by default, drawn in different
cells of the 3x3 grid on varying backgrounds and textures — what "3-5 photos of my dog" are for a real run.

``python -m pipelines.subject OUT_DIR [N] [SIZE]`` writes ``ref_0.png`` ... ``ref_{N-1}.png`` (a pure function of
its arguments). Nothing heavy is imported at module level.
"""

from __future__ import annotations

import sys
from pathlib import Path

# (cell, background, texture) of each picture: the object moves and the background changes, the subject stays
VIEWS = (((1, 1), "white", "plain"), ((0, 0), "grey", "noise"), ((2, 2), "black", "plain"),
         ((0, 2), "white", "stripes"), ((2, 0), "grey", "plain"))


def subject_scenes(n: int = 4, colour: str = "purple", shape: str = "triangle", size: str = "large") -> list:
    from pipelines.proving_world import Obj, Scene

    if not 1 <= n <= len(VIEWS):
        raise ValueError(f"n must be within 1..{len(VIEWS)}, got {n}")
    return [Scene((Obj(colour, shape, size, cell),), background=bg, texture=tex, texture_seed=k)
            for k, (cell, bg, tex) in enumerate(VIEWS[:n])]


def write_subject(out_dir: str | Path, n: int = 4, size: int = 64, colour: str = "purple",
                  shape: str = "triangle") -> list[Path]:
    """Render the subject's ``n`` reference pictures into ``out_dir`` (PNG, written atomically); their paths."""
    from pipelines.io import atomic_path
    from pipelines.proving_world import png_bytes, render

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, scene in enumerate(subject_scenes(n, colour, shape)):
        path = out / f"ref_{k}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(png_bytes(render(scene, size)))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m pipelines.subject OUT_DIR [N] [SIZE]", file=sys.stderr)
        return 2
    n = int(args[1]) if len(args) > 1 else 4
    size = int(args[2]) if len(args) > 2 else 64
    for p in write_subject(args[0], n, size):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
