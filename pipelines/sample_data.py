"""The bundled sample prompts (``pipelines/samples/``): procedurally drawn images and three prompt batches.

``python -m pipelines.sample_data [OUT_DIR]`` (default: ``pipelines/samples`` beside this file) rewrites them.
Everything is deterministic: the images are drawn with PIL from fixed recipes (no randomness, no downloads), so
re-running produces byte-identical PNGs and JSONL files.

Prompt rows follow the ``prompts`` contract minus ``prompt_id`` (the ingesting asset hashes it): ``task``,
``text``, ``source_image`` / ``reference_images`` (paths relative to the JSONL file's directory),
``reference_types``, ``tags``, ``split``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SIZE = 64
TASKS = ("t2i", "edit", "multi_ref")
REFERENCE_TYPES = ("subject", "style", "background", "pose", "object", "texture")
MAX_REFS = 6

RGB = tuple[int, int, int]
COLORS: dict[str, RGB] = {
    "red": (214, 48, 49),
    "orange": (240, 140, 30),
    "yellow": (246, 211, 60),
    "green": (46, 160, 67),
    "teal": (22, 160, 160),
    "blue": (40, 90, 200),
    "navy": (20, 30, 80),
    "purple": (130, 60, 170),
    "pink": (240, 130, 170),
    "brown": (120, 75, 40),
    "white": (245, 245, 240),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
    "sky": (135, 190, 235),
    "sand": (225, 200, 150),
}


# ------------------------------------------------------------------------------------------- drawing
def _gradient(top: RGB, bottom: RGB, horizontal: bool = False):
    from PIL import Image

    img = Image.new("RGB", (SIZE, SIZE))
    px = img.load()
    for y in range(SIZE):
        for x in range(SIZE):
            t = (x if horizontal else y) / (SIZE - 1)
            px[x, y] = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom))
    return img


def _radial(inner: RGB, outer: RGB):
    from PIL import Image

    img = Image.new("RGB", (SIZE, SIZE))
    px = img.load()
    c = (SIZE - 1) / 2
    rmax = math.hypot(c, c)
    for y in range(SIZE):
        for x in range(SIZE):
            t = math.hypot(x - c, y - c) / rmax
            px[x, y] = tuple(round(a + (b - a) * t) for a, b in zip(inner, outer))
    return img


def _star(cx: float, cy: float, r_out: float, r_in: float, points: int = 5) -> list[tuple[float, float]]:
    pts = []
    for i in range(points * 2):
        r = r_out if i % 2 == 0 else r_in
        a = -math.pi / 2 + i * math.pi / points
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw(base, ops: list[tuple[str, Any]]):
    """Apply simple drawing ops to ``base``: (op, args) with colours given by name."""
    from PIL import ImageDraw

    d = ImageDraw.Draw(base)
    for op, a in ops:
        if op == "circle":
            (x, y, r, col) = a
            d.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[col])
        elif op == "ring":
            (x, y, r, col, w) = a
            d.ellipse((x - r, y - r, x + r, y + r), outline=COLORS[col], width=w)
        elif op == "rect":
            (x0, y0, x1, y1, col) = a
            d.rectangle((x0, y0, x1, y1), fill=COLORS[col])
        elif op == "poly":
            (pts, col) = a
            d.polygon(pts, fill=COLORS[col])
        elif op == "star":
            (x, y, r, col) = a
            d.polygon(_star(x, y, r, r * 0.45), fill=COLORS[col])
        elif op == "line":
            (pts, col, w) = a
            d.line(pts, fill=COLORS[col], width=w)
        elif op == "stripes":
            (col_a, col_b, width, diagonal) = a
            for i in range(-SIZE, 2 * SIZE, width):
                col = COLORS[col_a] if (i // width) % 2 == 0 else COLORS[col_b]
                if diagonal:
                    d.polygon([(i, 0), (i + width, 0), (i + width - SIZE, SIZE), (i - SIZE, SIZE)], fill=col)
                else:
                    d.rectangle((i, 0, i + width - 1, SIZE), fill=col)
        elif op == "checker":
            (col_a, col_b, cell) = a
            for y in range(0, SIZE, cell):
                for x in range(0, SIZE, cell):
                    col = COLORS[col_a] if ((x // cell) + (y // cell)) % 2 == 0 else COLORS[col_b]
                    d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=col)
        elif op == "dots":
            (col, step, r) = a
            for y in range(step // 2, SIZE, step):
                for x in range(step // 2 + (y // step % 2) * step // 2, SIZE, step):
                    d.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[col])
        elif op == "figure":  # a stick figure; arms/legs angles in degrees give the pose
            (x, y, col, arm_l, arm_r, leg_l, leg_r) = a
            c = COLORS[col]
            d.ellipse((x - 5, y - 22, x + 5, y - 12), outline=c, width=2)
            d.line([(x, y - 12), (x, y + 6)], fill=c, width=2)
            for ang, (ox, oy), ln in ((arm_l, (x, y - 8), 11), (arm_r, (x, y - 8), 11),
                                      (leg_l, (x, y + 6), 13), (leg_r, (x, y + 6), 13)):
                rad = math.radians(ang)
                d.line([(ox, oy), (ox + ln * math.cos(rad), oy + ln * math.sin(rad))], fill=c, width=2)
        elif op == "mountains":
            (col, snow) = a
            d.polygon([(0, 50), (18, 22), (34, 44), (46, 28), (63, 50), (63, 63), (0, 63)], fill=COLORS[col])
            if snow:
                d.polygon([(18, 22), (14, 29), (22, 29)], fill=COLORS["white"])
                d.polygon([(46, 28), (42, 34), (50, 34)], fill=COLORS["white"])
        elif op == "house":
            (x, y, wall, roof) = a
            d.rectangle((x - 12, y - 10, x + 12, y + 12), fill=COLORS[wall])
            d.polygon([(x - 15, y - 10), (x, y - 24), (x + 15, y - 10)], fill=COLORS[roof])
            d.rectangle((x - 3, y + 2, x + 3, y + 12), fill=COLORS["brown"])
        elif op == "tree":
            (x, y, leaves) = a
            d.rectangle((x - 2, y, x + 2, y + 14), fill=COLORS["brown"])
            d.ellipse((x - 10, y - 16, x + 10, y + 4), fill=COLORS[leaves])
        elif op == "waves":
            (col, y0) = a
            for k in range(3):
                pts = [(x, y0 + 6 * k + 2 * math.sin(x / 4 + k)) for x in range(0, SIZE + 1, 2)]
                d.line(pts, fill=COLORS[col], width=2)
        else:  # pragma: no cover - recipes are fixed
            raise ValueError(f"unknown drawing op {op}")
    return base


def _bg(spec: tuple) -> Callable[[], Any]:
    kind, *args = spec
    if kind == "solid":
        from PIL import Image

        return lambda: Image.new("RGB", (SIZE, SIZE), COLORS[args[0]])
    if kind == "vgrad":
        return lambda: _gradient(COLORS[args[0]], COLORS[args[1]])
    if kind == "hgrad":
        return lambda: _gradient(COLORS[args[0]], COLORS[args[1]], horizontal=True)
    if kind == "radial":
        return lambda: _radial(COLORS[args[0]], COLORS[args[1]])
    raise ValueError(kind)


# name -> (background, ops). Sources for edits are "src_*", references "ref_*".
IMAGES: dict[str, tuple[tuple, list[tuple[str, Any]]]] = {
    # --- edit sources
    "src_001": (("vgrad", "sky", "white"), [("circle", (32, 34, 14, "red"))]),
    "src_002": (("vgrad", "sky", "green"), [("house", (30, 40, "white", "red")), ("tree", (52, 38, "green"))]),
    "src_003": (("vgrad", "orange", "purple"), [("mountains", ("navy", False)), ("circle", (48, 16, 6, "yellow"))]),
    "src_004": (("solid", "white"), [("rect", (14, 14, 50, 50, "blue")), ("rect", (24, 24, 40, 40, "yellow"))]),
    "src_005": (("vgrad", "sky", "blue"), [("waves", ("white", 36)), ("poly", ([(20, 30), (44, 30), (38, 38), (26, 38)], "brown"))]),
    "src_006": (("radial", "yellow", "orange"), [("star", (32, 32, 20, "red"))]),
    "src_007": (("solid", "sand"), [("figure", (32, 40, "black", 200, -20, 110, 70))]),
    "src_008": (("hgrad", "pink", "purple"), [("ring", (32, 32, 18, "white", 4)), ("circle", (32, 32, 6, "teal"))]),
    "src_009": (("vgrad", "navy", "black"), [("star", (14, 12, 3, "white")), ("star", (50, 20, 3, "white")),
                                             ("circle", (40, 44, 10, "grey"))]),
    "src_010": (("vgrad", "sky", "sand"), [("tree", (20, 36, "green")), ("tree", (44, 34, "teal")), ("rect", (0, 52, 63, 63, "brown"))]),
    "src_011": (("vgrad", "white", "grey"), [("poly", ([(32, 10), (52, 50), (12, 50)], "teal"))]),
    "src_012": (("vgrad", "sky", "sand"), [("circle", (16, 14, 7, "yellow")), ("rect", (0, 46, 63, 63, "sand")),
                                           ("waves", ("blue", 38))]),
    # --- references
    "ref_subject_fox": (("solid", "white"), [("poly", ([(16, 50), (32, 18), (48, 50)], "orange")),
                                             ("poly", ([(20, 26), (24, 12), (29, 22)], "orange")),
                                             ("poly", ([(35, 22), (40, 12), (44, 26)], "orange")),
                                             ("circle", (27, 34, 2, "black")), ("circle", (37, 34, 2, "black"))]),
    "ref_subject_robot": (("solid", "white"), [("rect", (20, 24, 44, 52, "grey")), ("rect", (24, 10, 40, 24, "grey")),
                                               ("circle", (28, 17, 2, "teal")), ("circle", (36, 17, 2, "teal")),
                                               ("line", ([(32, 10), (32, 4)], "black", 2))]),
    "ref_subject_cat": (("solid", "white"), [("circle", (32, 38, 14, "black")), ("poly", ([(20, 30), (22, 16), (30, 26)], "black")),
                                             ("poly", ([(34, 26), (42, 16), (44, 30)], "black")),
                                             ("circle", (27, 36, 2, "yellow")), ("circle", (37, 36, 2, "yellow"))]),
    "ref_style_stripes": (("solid", "white"), [("stripes", ("navy", "yellow", 6, True))]),
    "ref_style_dots": (("solid", "pink"), [("dots", ("white", 10, 3))]),
    "ref_style_sunset": (("vgrad", "purple", "orange"), []),
    "ref_background_mountains": (("vgrad", "sky", "white"), [("mountains", ("grey", True))]),
    "ref_background_beach": (("vgrad", "sky", "sand"), [("rect", (0, 44, 63, 63, "sand")), ("waves", ("blue", 34))]),
    "ref_background_night": (("vgrad", "navy", "black"), [("star", (10, 10, 3, "white")), ("star", (40, 8, 2, "white")),
                                                          ("star", (54, 24, 3, "yellow")), ("circle", (20, 40, 8, "white"))]),
    "ref_pose_wave": (("solid", "white"), [("figure", (32, 40, "black", 200, -70, 110, 70))]),
    "ref_pose_run": (("solid", "white"), [("figure", (32, 40, "black", 150, -30, 130, 30))]),
    "ref_object_umbrella": (("solid", "white"), [("poly", ([(12, 30), (32, 12), (52, 30)], "red")),
                                                 ("line", ([(32, 30), (32, 52), (28, 54)], "black", 2))]),
    "ref_object_mug": (("solid", "white"), [("rect", (20, 24, 40, 50, "teal")), ("ring", (44, 37, 7, "teal", 3))]),
    "ref_texture_checker": (("solid", "white"), [("checker", ("brown", "sand", 8))]),
    "ref_texture_waves": (("solid", "sky"), [("waves", ("navy", 10)), ("waves", ("navy", 30)), ("waves", ("navy", 50))]),
}


def draw_image(name: str):
    """The PIL RGB image of recipe ``name`` (64x64)."""
    bg, ops = IMAGES[name]
    return _draw(_bg(bg)(), ops)


# ------------------------------------------------------------------------------------------- prompts
def _t2i(text: str, tags: list[str], split: str = "train") -> dict[str, Any]:
    return {"task": "t2i", "text": text, "source_image": None, "reference_images": [], "reference_types": [],
            "tags": tags, "split": split}


def _edit(src: str, text: str, tags: list[str], split: str = "train") -> dict[str, Any]:
    return {"task": "edit", "text": text, "source_image": f"../images/{src}.png", "reference_images": [],
            "reference_types": [], "tags": tags, "split": split}


def _multi(refs: list[str], text: str, tags: list[str], split: str = "train") -> dict[str, Any]:
    types = [r.split("_")[1] for r in refs]  # ref_<type>_<what>
    return {"task": "multi_ref", "text": text, "source_image": None,
            "reference_images": [f"../images/{r}.png" for r in refs], "reference_types": types,
            "tags": tags, "split": split}


BATCHES: dict[str, list[dict[str, Any]]] = {
    "batch-0001": [
        _t2i("A red fox curled up asleep in fresh snow at dawn", ["animal", "winter"]),
        _t2i("A lighthouse on a rocky cliff during a thunderstorm, waves crashing below", ["landscape", "weather"]),
        _t2i("A bowl of ramen with a soft-boiled egg, steam rising, top-down photo", ["food", "photo"]),
        _t2i("An isometric pixel-art city block with tiny neon signs at night", ["pixel-art", "city"], "heldout"),
        _t2i("A watercolor painting of a hummingbird drinking from a purple flower", ["animal", "watercolor"]),
        _edit("src_001", "Turn the red ball into a green apple with a leaf", ["object-swap"]),
        _edit("src_002", "Make it winter: cover the roof and the tree with snow", ["season"]),
        _edit("src_003", "Change the sunset into a starry night sky", ["sky", "time-of-day"], "heldout"),
        _edit("src_004", "Make the yellow square a circle and keep the blue frame", ["shape"]),
        _multi(["ref_subject_fox", "ref_background_mountains"],
               "The fox sitting on a rock in front of the snowy mountains", ["subject", "background"]),
        _multi(["ref_subject_robot", "ref_style_stripes"],
               "The robot painted in the bold diagonal stripe style", ["subject", "style"]),
        _multi(["ref_subject_cat"], "The black cat wearing a tiny knitted scarf", ["subject"]),
    ],
    "batch-0002": [
        _t2i("A vintage bicycle leaning against a yellow brick wall, afternoon light", ["object", "photo"]),
        _t2i("A cozy reading nook with a window seat, rain on the glass", ["interior"]),
        _t2i("A macro photograph of a dewdrop on a spider web", ["macro", "photo"], "heldout"),
        _t2i("A paper origami crane on a wooden desk, soft shadows", ["object", "still-life"]),
        _t2i("A medieval castle floating on a cloud, fantasy illustration", ["fantasy", "illustration"]),
        _edit("src_005", "Replace the wooden boat with a red sailboat", ["object-swap"]),
        _edit("src_006", "Make the star gold and add a soft glow around it", ["color", "lighting"]),
        _edit("src_007", "Make the person raise both arms in celebration", ["pose"]),
        _edit("src_008", "Turn the background into a blue ocean gradient, keep the ring", ["background"]),
        _multi(["ref_subject_cat", "ref_background_beach", "ref_object_umbrella"],
               "The cat relaxing on the beach under the red umbrella", ["subject", "background", "object"]),
        _multi(["ref_subject_robot", "ref_pose_wave", "ref_background_night"],
               "The robot waving hello under a starry night sky", ["subject", "pose", "background"], "heldout"),
        _multi(["ref_object_mug", "ref_texture_checker"],
               "A mug with the brown checkerboard pattern on a kitchen table", ["object", "texture"]),
    ],
    "batch-0003": [
        _t2i("A snowy mountain village with warm lights in every window", ["landscape", "winter"]),
        _t2i("A cyberpunk street market in the rain, reflections on wet pavement", ["city", "sci-fi"]),
        _t2i("A close-up portrait of an old fisherman with a grey beard, film photo", ["portrait", "photo"]),
        _t2i("A field of sunflowers under a bright blue sky with a few clouds", ["landscape", "flowers"], "heldout"),
        _t2i("A minimalist logo of a mountain made of three triangles, flat vector", ["design", "vector"]),
        _edit("src_009", "Replace the grey moon with a glowing full moon", ["object-swap", "lighting"]),
        _edit("src_010", "Add autumn colours: turn the leaves orange and red", ["season", "color"]),
        _edit("src_011", "Make the triangle look like it is made of glass", ["material"], "heldout"),
        _edit("src_012", "Remove the sun and make the sky overcast", ["sky", "removal"]),
        _multi(["ref_subject_fox", "ref_pose_run", "ref_background_mountains"],
               "The fox running across a meadow toward the mountains", ["subject", "pose", "background"]),
        _multi(["ref_subject_cat", "ref_style_dots"], "The cat drawn in the pink polka-dot style", ["subject", "style"]),
        _multi(["ref_subject_robot", "ref_style_sunset", "ref_background_beach", "ref_pose_run", "ref_object_mug",
                "ref_texture_waves"],
               "The robot jogging along the beach at sunset holding the teal mug, waves patterned on its body",
               ["subject", "style", "background", "pose", "object", "texture"]),
    ],
}


def validate_row(row: dict[str, Any]) -> None:
    """Raise ValueError when a prompt row breaks the task/field invariants."""
    task = row.get("task")
    if task not in TASKS:
        raise ValueError(f"bad task {task!r}")
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        raise ValueError("empty text")
    refs, types = row.get("reference_images") or [], row.get("reference_types") or []
    if len(refs) != len(types):
        raise ValueError("reference_images and reference_types differ in length")
    if any(t not in REFERENCE_TYPES for t in types):
        raise ValueError(f"bad reference type in {types}")
    if task == "edit" and not row.get("source_image"):
        raise ValueError("edit row without source_image")
    if task != "edit" and row.get("source_image"):
        raise ValueError(f"{task} row with a source_image")
    if task == "multi_ref" and not 1 <= len(refs) <= MAX_REFS:
        raise ValueError(f"multi_ref needs 1..{MAX_REFS} references, got {len(refs)}")
    if task != "multi_ref" and refs:
        raise ValueError(f"{task} row with references")
    if row.get("split") not in ("train", "heldout"):
        raise ValueError(f"bad split {row.get('split')!r}")


def write_samples(out_dir: Path) -> dict[str, list[Path]]:
    """Draw the images into ``out_dir/images`` and write ``out_dir/prompts/batch-*.jsonl``."""
    out_dir = Path(out_dir)
    img_dir, prompt_dir = out_dir / "images", out_dir / "prompts"
    img_dir.mkdir(parents=True, exist_ok=True)
    prompt_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for name in IMAGES:
        path = img_dir / f"{name}.png"
        draw_image(name).save(path, format="PNG", optimize=True)
        images.append(path)
    prompts = []
    for batch, rows in BATCHES.items():
        for row in rows:
            validate_row(row)
            for rel in [row["source_image"], *row["reference_images"]]:
                if rel and not (prompt_dir / rel).resolve().is_file():
                    raise ValueError(f"{batch}: missing image {rel}")
        path = prompt_dir / f"{batch}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
        prompts.append(path)
    return {"images": images, "prompts": prompts}


def samples_dir() -> Path:
    return Path(__file__).resolve().parent / "samples"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else samples_dir()
    written = write_samples(target)
    print(f"wrote {len(written['images'])} images and {len(written['prompts'])} prompt batches under {target}")
