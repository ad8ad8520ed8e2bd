"""The proving ground's procedural world: small images of 1–4 simple objects and prompts that state checkable
facts (DESIGN.md "Proving ground").

* **Scenes** (:class:`Scene`): objects (:class:`Obj`: a colour of :data:`~labelers.verifier.OBJECT_COLOURS`, a
  shape circle / square / triangle, a size small / large) in distinct cells of a 3x3 grid, on a plain or lightly
  textured background (noise or stripes) whose colour is never an object colour.
* **Rendering** (:func:`render`): PIL drawing with anti-aliasing off, so every object pixel is exactly its palette
  colour; sizes 48–128 px (default 64).
* **Prompts**, in the grammar of :mod:`labelers.verifier` (which parses them back exactly):
  t2i — "two small red circles left of a blue square, and a green triangle above the blue square on a white
  background", "a large red circle in the top left on a grey background";
  edit — "make the red circle green", "remove the blue square", "turn the red circle into a square",
  "add a small green triangle left of the blue square" (the target scene is the source with that change);
  multi_ref — 2–4 reference pictures of one object each, "the object from picture 1 left of the object from
  picture 2, and the object from picture 3 above the object from picture 1 on a black background".
* **Batches** (:func:`write_batch`): prompt batch files in the project's JSONL format, edit sources and references
  written beside them under ``images/``. Everything is a function of the seed.

``python -m pipelines.proving_world OUT_DIR [SEED] [N_PER_TASK]`` writes one batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from labelers.verifier import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    EditSpec,
    Group,
    MultiRefSpec,
    Relation,
    T2ISpec,
    edit_text,
    multi_ref_text,
    t2i_text,
)

DEFAULT_SIZE = 64
TEXTURES = ("plain", "noise", "stripes")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CELLS = tuple((r, c) for r in range(3) for c in range(3))


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, col) of the 3x3 grid

    @property
    def key(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "white"
    texture: str = "plain"
    texture_seed: int = 0


@dataclass
class WorldItem:
    """One prompt of the world with its ground truth: ``scene`` is what a perfect image shows (the edit target)."""

    task: str
    text: str
    spec: Any  # T2ISpec | EditSpec | MultiRefSpec, what the verifier must parse back from ``text``
    scene: Scene
    source: Scene | None = None
    references: tuple[Scene, ...] = ()
    split: str = "train"
    tags: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ rendering
def render(scene: Scene, size: int = DEFAULT_SIZE):
    """The RGB PIL image of ``scene`` (``size`` x ``size``), drawn without anti-aliasing."""
    import numpy as np
    from PIL import Image, ImageDraw

    if not 48 <= size <= 128:
        raise ValueError(f"image size {size} outside 48..128")
    bg = np.array(BACKGROUND_COLOURS[scene.background], dtype=np.int16)
    pix = np.broadcast_to(bg, (size, size, 3)).copy()
    if scene.texture == "noise":
        rng = np.random.default_rng(scene.texture_seed)
        pix += rng.integers(-10, 11, size=(size, size, 1), dtype=np.int16)
    elif scene.texture == "stripes":
        shade = -14 if bg.mean() > 100 else 14
        period = 3 + scene.texture_seed % 3
        pix[:, ::period] += shade
    img = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        side = max(5, round(SIZES[o.size] * size))
        cx, cy = (o.cell[1] + 0.5) * size / 3, (o.cell[0] + 0.5) * size / 3
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        x1, y1 = x0 + side - 1, y0 + side - 1
        colour = OBJECT_COLOURS[o.colour]
        if o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
    return img


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ sampling
def _holds(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether cell ``a`` is strictly ``rel`` cell ``b`` (another column / row)."""
    return {"left of": a[1] < b[1], "right of": a[1] > b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[rel]


def _background(rng: random.Random) -> tuple[str, str, int]:
    return rng.choice(list(BACKGROUND_COLOURS)), rng.choice(TEXTURES), rng.randrange(1 << 16)


def _keys(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return rng.sample([(c, s) for c in OBJECT_COLOURS for s in SHAPES], n)


def _link(rng: random.Random, cells: list[list[tuple[int, int]]]) -> list[Relation] | None:
    """A relation from every group i >= 1 to an earlier one that holds for all their cells (randomly oriented),
    or None when some group has none."""
    out = []
    for i in range(1, len(cells)):
        options = [(j, rel) for j in range(i) for rel in RELATIONS
                   if all(_holds(rel, a, b) for a in cells[i] for b in cells[j])]
        if not options:
            return None
        j, rel = rng.choice(options)
        out.append(Relation(i, rel, j) if rng.random() < 0.5 else Relation(j, INVERSE[rel], i))
    rng.shuffle(out)
    return out


def _first_mention_order(relations: list[Relation], n: int) -> list[int]:
    order: list[int] = []
    for r in relations:
        for g in (r.a, r.b):
            if g not in order:
                order.append(g)
    return order + [g for g in range(n) if g not in order]


def sample_t2i(rng: random.Random, max_objects: int = 3) -> tuple[T2ISpec, Scene]:
    """A t2i prompt and its scene; ``max_objects`` < 3 draws from the simpler part of the world only (the proving
    ground's generator learns single objects first)."""
    background, texture, tseed = _background(rng)
    n_groups = rng.choice((1, 2, 2, 3)) if max_objects >= 3 else rng.choice((1, 2, 2)[:2 * max_objects - 1])
    if max_objects == 1:
        counts = {1: [1]}
    else:
        counts = {1: [rng.choice((1, 1, 2, 3))], 2: rng.choice(([1, 1], [1, 1], [2, 1], [1, 2])), 3: [1, 1, 1]}
    counts = counts[n_groups]
    if sum(counts) > max_objects:
        counts = [1] * n_groups
    keys = _keys(rng, n_groups)
    sizes = [rng.choice(list(SIZES)) for _ in keys]
    while True:
        flat = rng.sample(CELLS, sum(counts))
        cells, k = [], 0
        for c in counts:
            cells.append(flat[k:k + c])
            k += c
        relations = _link(rng, cells)
        if relations is not None:
            break
    order = _first_mention_order(relations, n_groups)  # the parser numbers groups by first mention
    pos = {g: i for i, g in enumerate(order)}
    groups = tuple(Group(keys[g][0], keys[g][1], counts[g], sizes[g] if rng.random() < 0.5 else None) for g in order)
    relations = tuple(Relation(pos[r.a], r.rel, pos[r.b]) for r in relations)
    cell = cells[0][0] if n_groups == 1 and counts[0] == 1 and rng.random() < 0.5 else None
    objects = tuple(Obj(keys[g][0], keys[g][1], sizes[g], c) for g in order for c in cells[g])
    return T2ISpec(groups, relations, cell, background), Scene(objects, background, texture, tseed)


def _source_scene(rng: random.Random, n: int) -> Scene:
    background, texture, tseed = _background(rng)
    keys, cells = _keys(rng, n), rng.sample(CELLS, n)
    return Scene(tuple(Obj(k[0], k[1], rng.choice(list(SIZES)), c) for k, c in zip(keys, cells)), background,
                 texture, tseed)


def apply_edit(scene: Scene, spec: EditSpec, cell: tuple[int, int] | None = None) -> Scene:
    """The target scene of ``spec`` on ``scene`` (``cell``: where an added object goes)."""
    objs = list(scene.objects)
    if spec.op == "add":
        objs.append(Obj(spec.colour, spec.shape, spec.size, cell))
    else:
        i = next(k for k, o in enumerate(objs) if o.key == (spec.colour, spec.shape))
        if spec.op == "remove":
            objs.pop(i)
        elif spec.op == "recolour":
            objs[i] = replace(objs[i], colour=spec.new_colour)
        else:
            objs[i] = replace(objs[i], shape=spec.new_shape)
    return replace(scene, objects=tuple(objs))


def sample_edit(rng: random.Random) -> tuple[EditSpec, Scene, Scene]:
    while True:
        source = _source_scene(rng, rng.choice((1, 2, 2, 3)))
        keys = {o.key for o in source.objects}
        op = rng.choice(("recolour", "remove", "reshape", "add"))
        target = rng.choice(source.objects)
        if op == "recolour":
            new = [c for c in OBJECT_COLOURS if (c, target.shape) not in keys]
            spec = EditSpec(op, target.colour, target.shape, new_colour=rng.choice(new))
        elif op == "reshape":
            new = [s for s in SHAPES if (target.colour, s) not in keys]
            if not new:
                continue
            spec = EditSpec(op, target.colour, target.shape, new_shape=rng.choice(new))
        elif op == "remove":
            spec = EditSpec(op, target.colour, target.shape)
        else:
            used = {o.cell for o in source.objects}
            options = [(c, rel) for c in CELLS if c not in used for rel in RELATIONS if _holds(rel, c, target.cell)]
            key = rng.choice([(c, s) for c in OBJECT_COLOURS for s in SHAPES if (c, s) not in keys])
            cell, rel = rng.choice(options)
            spec = EditSpec(op, key[0], key[1], size=rng.choice(list(SIZES)), rel=rel, anchor=target.key)
            return spec, source, apply_edit(source, spec, cell)
        return spec, source, apply_edit(source, spec)


def sample_multi_ref(rng: random.Random) -> tuple[MultiRefSpec, tuple[Scene, ...], Scene]:
    background, texture, tseed = _background(rng)
    n = rng.choice((2, 2, 3, 4))
    keys, sizes = _keys(rng, n), [rng.choice(list(SIZES)) for _ in range(n)]
    while True:
        cells = rng.sample(CELLS, n)
        relations = _link(rng, [[c] for c in cells])
        if relations is not None:
            break
    refs = []
    for k, s in zip(keys, sizes):
        bg, tex, ts = _background(rng)
        refs.append(Scene((Obj(k[0], k[1], s, (1, 1)),), bg, tex, ts))
    target = Scene(tuple(Obj(k[0], k[1], s, c) for k, s, c in zip(keys, sizes, cells)), background, texture, tseed)
    return MultiRefSpec(n, tuple(relations), background), tuple(refs), target


def world_item(seed: int, task: str, index: int, max_objects: int = 3, plain: bool = False) -> WorldItem:
    """Item ``index`` of ``task`` in the world of ``seed`` (a pure function of its arguments; ``max_objects`` bounds
    the objects of a t2i scene, 1..3; ``plain`` drops the background textures — the prompts never state them — and
    leaves everything else, prompt text included, as it is)."""
    if plain:
        item = world_item(seed, task, index, max_objects)
        flat = lambda scene: replace(scene, texture="plain")  # noqa: E731
        return replace(item, scene=flat(item.scene), source=flat(item.source) if item.source else None,
                       references=tuple(flat(r) for r in item.references))
    rng = random.Random(f"prefmill-proving:{seed}:{task}:{index}" + (f":max{max_objects}" if max_objects < 3 else ""))
    if task == "t2i":
        spec, scene = sample_t2i(rng, max_objects)
        return WorldItem(task, t2i_text(spec), spec, scene, tags=["proving", f"groups-{len(spec.groups)}"])
    if task == "edit":
        spec, source, scene = sample_edit(rng)
        return WorldItem(task, edit_text(spec), spec, scene, source=source, tags=["proving", spec.op])
    if task == "multi_ref":
        spec, refs, scene = sample_multi_ref(rng)
        return WorldItem(task, multi_ref_text(spec), spec, scene, references=refs,
                         tags=["proving", f"refs-{spec.n_refs}"])
    raise ValueError(f"unknown task {task!r}")


def world_items(seed: int, task: str, n: int, max_objects: int = 3, plain: bool = False) -> list[WorldItem]:
    return [world_item(seed, task, i, max_objects, plain) for i in range(n)]


# ------------------------------------------------------------------------------------------------ batches
def write_batch(out_dir: str | Path, seed: int, n_per_task: int | dict[str, int] = 12, size: int = DEFAULT_SIZE,
                heldout_fraction: float = 0.2, name: str | None = None,
                max_objects: int = 3, plain: bool = False) -> tuple[Path, list[WorldItem]]:
    """Write ``out_dir/<name>.jsonl`` (default ``proving-<seed>``) with the world's prompts and the edit sources /
    references under ``out_dir/images/`` (named by content hash, so identical pictures are written once).
    Returns the file and its items (duplicates of an earlier row — same task, text and pictures — skipped)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    counts = n_per_task if isinstance(n_per_task, dict) else {t: n_per_task for t in ("t2i", "edit", "multi_ref")}
    split_rng = random.Random(f"prefmill-proving-split:{seed}")
    rows, items, seen = [], [], set()

    def save(scene: Scene) -> str:
        data = png_bytes(render(scene, size))
        rel = f"images/{hashlib.sha256(data).hexdigest()[:16]}.png"
        path = out_dir / rel
        if not path.exists():
            path.write_bytes(data)
        return rel

    for task, n in counts.items():
        for i in range(n):
            item = world_item(seed, task, i, max_objects, plain)
            item.split = "heldout" if split_rng.random() < heldout_fraction else "train"
            source = save(item.source) if item.source is not None else None
            refs = [save(r) for r in item.references]
            key = (task, item.text, source, tuple(refs))
            if key in seen:
                continue
            seen.add(key)
            rows.append({"task": task, "text": item.text, "source_image": source, "reference_images": refs,
                         "reference_types": ["object"] * len(refs), "tags": item.tags, "split": item.split})
            items.append(item)
    path = out_dir / f"{name or f'proving-{seed}'}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path, items


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.proving_world",
                                     description="write one prompt batch of the proving ground's world")
    parser.add_argument("out", nargs="?", default="proving", type=Path)
    parser.add_argument("seed", nargs="?", default=0, type=int)
    parser.add_argument("n", nargs="?", default=12, type=int, help="prompts per task")
    parser.add_argument("--tasks", default="t2i,edit,multi_ref", help="comma-separated")
    parser.add_argument("--max-objects", type=int, default=3, help="objects per t2i scene, 1..3")
    parser.add_argument("--heldout-fraction", type=float, default=0.2)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="pixels of the edit sources / references")
    parser.add_argument("--name", default=None, help="batch file name (default proving-<seed>)")
    parser.add_argument("--plain", action="store_true", help="no background textures in sources / references")
    args = parser.parse_args(argv)
    counts = {t.strip(): args.n for t in args.tasks.split(",") if t.strip()}
    written, items = write_batch(args.out, args.seed, counts, size=args.size, heldout_fraction=args.heldout_fraction,
                                 name=args.name, max_objects=args.max_objects, plain=args.plain)
    heldout = sum(it.split == "heldout" for it in items)
    print(f"wrote {len(items)} prompts ({heldout} held out) to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
