"""The proving-ground verifier: reads an image of the procedural world (:mod:`pipelines.proving_world`) and checks
every fact its prompt states; offered as a judge backend (``judge.backend: verifier``) with the judge's contract.

The world's vocabulary and prompt grammar live here (the world writes prompts with :func:`t2i_text` /
:func:`edit_text` / :func:`multi_ref_text`, the verifier reads them back with :func:`parse_prompt`), so the two
can never drift apart. The grammar is ours, so parsing is exact: a prompt outside it is that item's
``parse_error`` with the reason, never an exception for the batch.

Reading an image (:func:`detect`): every pixel takes the nearest palette colour (objects + backgrounds) within
:data:`COLOUR_THRESHOLD`; per object colour, 8-connected components of at least :func:`min_area` pixels are objects;
each is classified by its bounding box (fill ratio: square ≈ 1, circle ≈ π/4, triangle ≈ 0.5; the share of its
pixels in the top half separates the upright triangle, ≈ 0.25, from the circle, 0.5) and sized by its longer side.
The background is the commonest background colour. What is neither background nor a recognised object is
*unexplained* (it lowers ``visual_quality``).

Facts (:class:`Fact`, each with ``dimension``, ``passed`` and a ``message`` naming what failed):

* ``count`` — exactly N objects of a colour and shape ("expected 2 red circles, found 1"; a missing object whose
  shape is there in another colour reads "the circle is blue, not red", in another shape "the red object is a
  square, not a circle");
* ``size`` — those objects are small / large; ``cell`` — a lone object is in the stated cell of a 3x3 grid;
* ``relation`` — every object of one group is left of / right of / above / below every object of another;
* ``background`` — the background colour; ``no_extra`` — nothing but the stated objects;
* edits: ``instruction`` facts (the recolour / reshape happened in place, the removed object is gone, the added
  object is there and where the text says) and ``preserved`` facts (every other source object still there with
  its colour, shape, size and place; the background unchanged; nothing added);
* multi_ref: the object of each reference picture (colour + shape read from the picture) appears once
  (``reference``), in the stated arrangement (``relation``) on the stated background.

Scores: an alignment-like dimension is ``round(5 × passed / total)`` of its facts, at most 4 when one fails;
``visual_quality`` (and t2i's ``aesthetics``, which the verifier cannot judge otherwise) falls from 5 to 0 as the
unexplained share of the image goes from 0 to :data:`UNEXPLAINED_ZERO`.

One module (over ~500 lines) on purpose: the prompt grammar, the reader and the fact checks must stay in step, and one file keeps them from drifting apart.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelers.judge.inputs import prepare_item
from labelers.judge.protocol import (
    FEEDBACK_MAX_CHARS,
    STATUS_IMAGE_ERROR,
    STATUS_OK,
    STATUS_PARSE_ERROR,
    JudgeItem,
    JudgeResult,
    judge_id,
)
from labelers.judge.retry import JudgeBase
from labelers.rubrics import SCORE_MAX

VERIFIER_VERSION = 1

RGB = tuple[int, int, int]
# Object colours: far apart from each other and from every background colour (Euclidean RGB distance > 110,
# so nearest-colour labels are unambiguous well past COLOUR_THRESHOLD).
OBJECT_COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 50, 200),
}
BACKGROUND_COLOURS: dict[str, RGB] = {
    "white": (240, 240, 235),
    "grey": (150, 150, 150),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.16, "large": 0.27}  # side as a fraction of the image width
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
RELATIONS = ("left of", "right of", "above", "below")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
NUMBERS = {1: "a", 2: "two", 3: "three"}
COLOUR_THRESHOLD = 70.0  # a pixel farther than this from every palette colour is unexplained
UNEXPLAINED_ZERO = 0.15  # share of unexplained pixels at which visual_quality reaches 0


class PromptParseError(ValueError):
    """A prompt outside the proving-world grammar (or one its images contradict); ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Facts as the prompts state them
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    colour: str
    shape: str
    count: int = 1
    size: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Relation:
    a: int  # group / picture index
    rel: str
    b: int


@dataclass(frozen=True)
class T2ISpec:
    groups: tuple[Group, ...]
    relations: tuple[Relation, ...] = ()
    cell: tuple[int, int] | None = None  # (row, col) of a lone object
    background: str = "white"


@dataclass(frozen=True)
class EditSpec:
    op: str  # recolour | remove | reshape | add
    colour: str
    shape: str
    new_colour: str | None = None  # recolour
    new_shape: str | None = None  # reshape
    size: str | None = None  # add
    rel: str | None = None  # add: where, relative to the anchor
    anchor: tuple[str, str] | None = None  # add: (colour, shape) of a source object


@dataclass(frozen=True)
class MultiRefSpec:
    n_refs: int
    relations: tuple[Relation, ...]  # between 0-based picture indices
    background: str = "white"


def cell_name(cell: tuple[int, int]) -> str:
    row, col = ROWS[cell[0]], COLS[cell[1]]
    return "center" if row == col == "middle" else f"{row} {col}"


def _plural(shape: str, n: int) -> str:
    return shape + ("s" if n > 1 else "")


def group_phrase(g: Group) -> str:
    size = f"{g.size} " if g.size else ""
    return f"{NUMBERS[g.count]} {size}{g.colour} {_plural(g.shape, g.count)}"


def _ref_phrase(g: Group) -> str:
    return f"the {g.colour} {_plural(g.shape, g.count)}"


def t2i_text(spec: T2ISpec) -> str:
    """The prompt of a t2i spec: groups are introduced ("two small red circles") on first mention and referred
    to ("the red circles") afterwards; relation clauses are joined by ", and "."""
    introduced: set[int] = set()

    def np_(i: int) -> str:
        if i in introduced:
            return _ref_phrase(spec.groups[i])
        introduced.add(i)
        return group_phrase(spec.groups[i])

    if spec.relations:
        clauses = [f"{np_(r.a)} {r.rel} {np_(r.b)}" for r in spec.relations]
        body = ", and ".join(clauses)
    else:
        body = " and ".join(np_(i) for i in range(len(spec.groups)))
        if spec.cell is not None:
            body += f" in the {cell_name(spec.cell)}"
    return f"{body} on a {spec.background} background"


def edit_text(spec: EditSpec) -> str:
    if spec.op == "recolour":
        return f"make the {spec.colour} {spec.shape} {spec.new_colour}"
    if spec.op == "remove":
        return f"remove the {spec.colour} {spec.shape}"
    if spec.op == "reshape":
        return f"turn the {spec.colour} {spec.shape} into a {spec.new_shape}"
    if spec.op == "add":
        return f"add a {spec.size} {spec.colour} {spec.shape} {spec.rel} the {spec.anchor[0]} {spec.anchor[1]}"
    raise ValueError(f"unknown edit op {spec.op!r}")


def multi_ref_text(spec: MultiRefSpec) -> str:
    clauses = [f"the object from picture {r.a + 1} {r.rel} the object from picture {r.b + 1}" for r in spec.relations]
    return f"{', and '.join(clauses)} on a {spec.background} background"


# ----------------------------------------------------------------------------------------------------------------
# Parsing (exact: the grammar is ours)
# ----------------------------------------------------------------------------------------------------------------
_C = "|".join(OBJECT_COLOURS)
_S = "|".join(SHAPES)
_REL = "|".join(RELATIONS)
_NP_RE = re.compile(rf"(a|two|three|the) (?:(small|large) )?({_C}) ({_S})(s?)")
_BG_RE = re.compile(rf"^(.*) on a ({'|'.join(BACKGROUND_COLOURS)}) background$")
_CELL_NAMES = {cell_name((r, c)): (r, c) for r in range(3) for c in range(3)}
_CELL_RE = re.compile(rf"^(.*) in the ({'|'.join(_CELL_NAMES)})$")
_WORD_NUM = {"a": 1, "two": 2, "three": 3}


def _normalise(text: str) -> str:
    if not isinstance(text, str):
        raise PromptParseError(f"prompt is {type(text).__name__}, not text")
    return " ".join(text.strip().lower().rstrip(".").split())


def _parse_np(phrase: str, groups: list[Group]) -> int:
    m = _NP_RE.fullmatch(phrase)
    if not m:
        raise PromptParseError(f"not an object phrase: {phrase!r}")
    det, size, colour, shape, plural = m.groups()
    if det == "the":
        if size:
            raise PromptParseError(f"a reference takes no size: {phrase!r}")
        for i, g in enumerate(groups):
            if g.key == (colour, shape):
                if (g.count > 1) != bool(plural):
                    raise PromptParseError(f"{phrase!r} disagrees in number with its first mention")
                return i
        raise PromptParseError(f"{phrase!r} refers to no object mentioned before")
    count = _WORD_NUM[det]
    if (count > 1) != bool(plural):
        raise PromptParseError(f"number and noun disagree in {phrase!r}")
    if any(g.key == (colour, shape) for g in groups):
        raise PromptParseError(f"{colour} {shape} introduced twice")
    groups.append(Group(colour, shape, count, size))
    return len(groups) - 1


def parse_t2i(text: str) -> T2ISpec:
    t = _normalise(text)
    m = _BG_RE.fullmatch(t)
    if not m:
        raise PromptParseError("no 'on a <colour> background' ending")
    body, background = m.groups()
    groups: list[Group] = []
    relations: list[Relation] = []
    cell = None
    if re.search(rf" ({_REL}) ", f" {body} "):
        for clause in body.split(", and "):
            cm = re.fullmatch(rf"(.+?) ({_REL}) (.+)", clause)
            if not cm:
                raise PromptParseError(f"not a relation clause: {clause!r}")
            a = _parse_np(cm.group(1), groups)
            b = _parse_np(cm.group(3), groups)
            if a == b:
                raise PromptParseError(f"an object related to itself: {clause!r}")
            relations.append(Relation(a, cm.group(2), b))
    else:
        cm = _CELL_RE.fullmatch(body)
        if cm:
            body, cell = cm.group(1), _CELL_NAMES[cm.group(2)]
        for phrase in body.split(" and "):
            _parse_np(phrase, groups)
        if cell is not None and (len(groups) != 1 or groups[0].count != 1):
            raise PromptParseError("a grid cell is stated for a lone object only")
    return T2ISpec(tuple(groups), tuple(relations), cell, background)


_EDIT_RES = {
    "recolour": re.compile(rf"make the ({_C}) ({_S}) ({_C})"),
    "remove": re.compile(rf"remove the ({_C}) ({_S})"),
    "reshape": re.compile(rf"turn the ({_C}) ({_S}) into a ({_S})"),
    "add": re.compile(rf"add a (small|large) ({_C}) ({_S}) ({_REL}) the ({_C}) ({_S})"),
}


def parse_edit(text: str) -> EditSpec:
    t = _normalise(text)
    for op, rx in _EDIT_RES.items():
        m = rx.fullmatch(t)
        if not m:
            continue
        g = m.groups()
        if op == "recolour":
            if g[0] == g[2]:
                raise PromptParseError("recolour to the same colour")
            return EditSpec(op, g[0], g[1], new_colour=g[2])
        if op == "remove":
            return EditSpec(op, g[0], g[1])
        if op == "reshape":
            if g[1] == g[2]:
                raise PromptParseError("reshape to the same shape")
            return EditSpec(op, g[0], g[1], new_shape=g[2])
        return EditSpec(op, g[1], g[2], size=g[0], rel=g[3], anchor=(g[4], g[5]))
    raise PromptParseError(f"not an edit instruction of the proving world: {t[:60]!r}")


_PIC_CLAUSE_RE = re.compile(rf"the object from picture (\d) ({_REL}) the object from picture (\d)")


def parse_multi_ref(text: str, n_refs: int | None = None) -> MultiRefSpec:
    t = _normalise(text)
    m = _BG_RE.fullmatch(t)
    if not m:
        raise PromptParseError("no 'on a <colour> background' ending")
    body, background = m.groups()
    relations = []
    for clause in body.split(", and "):
        cm = _PIC_CLAUSE_RE.fullmatch(clause)
        if not cm:
            raise PromptParseError(f"not a picture relation clause: {clause!r}")
        a, b = int(cm.group(1)) - 1, int(cm.group(3)) - 1
        if a == b or a < 0 or b < 0:
            raise PromptParseError(f"bad picture numbers in {clause!r}")
        relations.append(Relation(a, cm.group(2), b))
    used = {i for r in relations for i in (r.a, r.b)}
    n = n_refs if n_refs is not None else max(used) + 1
    if max(used) >= n:
        raise PromptParseError(f"the text names picture {max(used) + 1} but there are {n} references")
    if used != set(range(n)):
        missing = sorted(set(range(n)) - used)
        raise PromptParseError(f"the text never places picture(s) {[i + 1 for i in missing]}")
    return MultiRefSpec(n, tuple(relations), background)


def parse_prompt(task: str, text: str, n_refs: int | None = None) -> T2ISpec | EditSpec | MultiRefSpec:
    if task == "t2i":
        return parse_t2i(text)
    if task == "edit":
        return parse_edit(text)
    if task == "multi_ref":
        return parse_multi_ref(text, n_refs)
    raise PromptParseError(f"unknown task {task!r}")


# ----------------------------------------------------------------------------------------------------------------
# Reading an image
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str  # circle | square | triangle | blob
    size: str  # small | large
    cx: float  # centre, as a fraction of the width / height
    cy: float
    area: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def cell(self) -> tuple[int, int]:
        return (min(2, int(self.cy * 3)), min(2, int(self.cx * 3)))

    def describe(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Reading:
    objects: list[Detected]
    background: str | None
    unexplained: float  # share of pixels that are neither background nor a recognised object
    blobs: int = 0  # object-coloured components too small or of no known shape


def min_area(width: int) -> int:
    return max(4, int((width * 0.08) ** 2))


def classify_shape(mask: Any) -> str:
    """circle / square / triangle / blob of a boolean component mask cropped to its bounding box."""
    h, w = mask.shape
    area = float(mask.sum())
    fill = area / (h * w)
    aspect = w / h
    if not 0.75 <= aspect <= 1.33:
        return "blob"
    top = float(mask[: h // 2].sum()) + (float(mask[h // 2].sum()) / 2 if h % 2 else 0.0)
    top_share = top / area
    if fill >= 0.9:
        return "square"
    if 0.35 <= fill <= 0.7 and top_share < 0.4:
        return "triangle"
    if 0.65 <= fill < 0.9 and 0.4 <= top_share <= 0.6:
        return "circle"
    return "blob"


def detect(image: Any) -> Reading:
    """Segment ``image`` (PIL) into background and objects of the palette."""
    import numpy as np
    from scipy import ndimage

    pix = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = pix.shape
    names = list(OBJECT_COLOURS) + list(BACKGROUND_COLOURS)
    palette = np.array(list(OBJECT_COLOURS.values()) + list(BACKGROUND_COLOURS.values()), dtype=np.float32)
    best = np.full((h, w), np.inf, dtype=np.float32)
    label = np.full((h, w), -1, dtype=np.int64)
    for k, colour in enumerate(palette):  # one palette colour at a time: memory stays O(pixels)
        dist = np.sqrt(((pix - colour) ** 2).sum(-1))
        closer = dist < best
        best[closer], label[closer] = dist[closer], k
    label[best > COLOUR_THRESHOLD] = -1
    n_obj = len(OBJECT_COLOURS)
    explained = np.zeros((h, w), dtype=bool)
    bg_counts = [(int((label == n_obj + k).sum()), names[n_obj + k]) for k in range(len(BACKGROUND_COLOURS))]
    n_bg, background = max(bg_counts)
    if n_bg == 0:
        background = None
    else:
        explained |= label == names.index(background)
    objects: list[Detected] = []
    blobs = 0
    structure = np.ones((3, 3), dtype=bool)
    for k, colour in enumerate(OBJECT_COLOURS):
        comps, n = ndimage.label(label == k, structure=structure)
        for sl_i, sl in enumerate(ndimage.find_objects(comps), start=1):
            if sl is None:
                continue
            mask = comps[sl] == sl_i
            area = int(mask.sum())
            if area < min_area(w):
                blobs += 1
                continue
            shape = classify_shape(mask)
            if shape == "blob":
                blobs += 1
                continue
            cy = (sl[0].start + sl[0].stop) / 2 / h
            cx = (sl[1].start + sl[1].stop) / 2 / w
            side = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) / w
            objects.append(Detected(colour, shape, "small" if side < SIZE_SPLIT else "large", float(cx), float(cy),
                                    area))
            region = np.zeros((h, w), dtype=bool)
            region[sl] = mask
            explained |= region
    objects.sort(key=lambda o: (o.cy, o.cx))
    return Reading(objects, background, float(1.0 - explained.mean()), blobs)


# ----------------------------------------------------------------------------------------------------------------
# Checking facts
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    kind: str  # count | size | cell | relation | background | no_extra | instruction | preserved | reference
    dimension: str  # the rubric dimension it counts towards
    statement: str
    passed: bool
    message: str = ""  # why it failed (empty when it holds)


def _holds(rel: str, a: Detected, b: Detected) -> bool:
    if rel == "left of":
        return a.cx < b.cx
    if rel == "right of":
        return a.cx > b.cx
    if rel == "above":
        return a.cy < b.cy
    return a.cy > b.cy  # below


def _pl(g: Group | tuple[str, str], n: int) -> str:
    colour, shape = g.key if isinstance(g, Group) else g
    return f"{n} {colour} {_plural(shape, n)}"


def _group_facts(groups: Sequence[Group], relations: Sequence[Relation], background: str, reading: Reading,
                 count_dim: str, rest_dim: str, cell: tuple[int, int] | None = None,
                 names: Sequence[str] | None = None) -> list[Fact]:
    """Facts of stated groups (t2i, and multi_ref's reference objects) against ``reading``."""
    facts: list[Fact] = []
    keys = {g.key for g in groups}
    found = {g.key: [o for o in reading.objects if o.key == g.key] for g in groups}
    strays = [o for o in reading.objects if o.key not in keys]
    for i, g in enumerate(groups):
        label = f"{g.colour} {g.shape}" + (f" from picture {names[i]}" if names else "")
        got = found[g.key]
        msg = ""
        if len(got) < g.count:
            recoloured = [o for o in strays if o.shape == g.shape]
            reshaped = [o for o in strays if o.colour == g.colour]
            if recoloured:
                msg = f"the {g.shape}{' from picture ' + names[i] if names else ''} is {recoloured[0].colour}, " \
                      f"not {g.colour}"
            elif reshaped:
                msg = f"the {g.colour} object is a {reshaped[0].shape}, not a {g.shape}"
            else:
                msg = f"expected {_pl(g, g.count)}, found {len(got)}" if not names else f"the {label} is missing"
            if recoloured or reshaped:
                strays = [o for o in strays if o is not (recoloured or reshaped)[0]]
        elif len(got) > g.count:
            msg = f"expected {_pl(g, g.count)}, found {len(got)}"
        facts.append(Fact("reference" if names else "count", count_dim, f"{_pl(g, g.count)}", not msg, msg))
        if g.size:
            wrong = [o for o in got if o.size != g.size]
            msg = "" if got and not wrong else (
                f"the {label} is {wrong[0].size}, not {g.size}" if wrong else f"no {label} to be {g.size}")
            facts.append(Fact("size", count_dim, f"{label} is {g.size}", not msg, msg))
    if cell is not None:
        got = found[groups[0].key]
        label = f"{groups[0].colour} {groups[0].shape}"
        msg = ""
        if len(got) != 1:
            msg = f"no single {label} to be in the {cell_name(cell)}"
        elif got[0].cell != cell:
            msg = f"the {label} is in the {cell_name(got[0].cell)}, not the {cell_name(cell)}"
        facts.append(Fact("cell", rest_dim, f"{label} in the {cell_name(cell)}", not msg, msg))
    for r in relations:
        ga, gb = groups[r.a], groups[r.b]
        la = f"{ga.colour} {ga.shape}" + (f" (picture {names[r.a]})" if names else "")
        lb = f"{gb.colour} {gb.shape}" + (f" (picture {names[r.b]})" if names else "")
        oa, ob = found[ga.key], found[gb.key]
        if not oa or not ob:
            msg = f"no {la if not oa else lb} to place"
        else:
            msg = "" if all(_holds(r.rel, a, b) for a in oa for b in ob) else f"the {la} is not {r.rel} the {lb}"
        facts.append(Fact("relation", rest_dim, f"{la} {r.rel} {lb}", not msg, msg))
    facts.append(_background_fact(background, reading, rest_dim))
    strays = [o for o in reading.objects if o.key not in keys]
    msg = f"unexpected {', '.join(o.describe() for o in strays[:2])}" if strays else ""
    facts.append(Fact("no_extra", rest_dim, "nothing else", not msg, msg))
    return facts


def _background_fact(background: str, reading: Reading, dim: str) -> Fact:
    msg = "" if reading.background == background else f"the background is {reading.background or 'unreadable'}, " \
                                                       f"not {background}"
    return Fact("background", dim, f"{background} background", not msg, msg)


def check_t2i(spec: T2ISpec, reading: Reading) -> list[Fact]:
    return _group_facts(spec.groups, spec.relations, spec.background, reading, "prompt_alignment",
                        "prompt_alignment", spec.cell)


def read_reference(image: Any, index: int) -> Detected:
    reading = detect(image)
    if len(reading.objects) != 1:
        raise PromptParseError(f"reference picture {index + 1} shows {len(reading.objects)} recognisable objects, "
                               "not 1")
    return reading.objects[0]


def check_multi_ref(spec: MultiRefSpec, references: Sequence[Detected], reading: Reading) -> list[Fact]:
    groups = [Group(o.colour, o.shape) for o in references]
    if len({g.key for g in groups}) != len(groups):
        raise PromptParseError("two reference pictures show the same kind of object")
    names = [str(i + 1) for i in range(len(groups))]
    return _group_facts(groups, spec.relations, spec.background, reading, "reference_fidelity", "prompt_alignment",
                        names=names)


def _near(o: Detected, x: float, y: float, tol: float) -> bool:
    return abs(o.cx - x) <= tol and abs(o.cy - y) <= tol


def check_edit(spec: EditSpec, source: Reading, reading: Reading, tol: float = 1 / 6) -> list[Fact]:
    """Instruction facts (``instruction_following``) and preservation facts (``detail_preservation``)."""
    ins, keep = "instruction_following", "detail_preservation"
    targets = [o for o in source.objects if o.key == (spec.colour, spec.shape)]
    facts: list[Fact] = []
    name = f"{spec.colour} {spec.shape}"
    if spec.op == "add":
        anchors = [o for o in source.objects if o.key == spec.anchor]
        if len(anchors) != 1:
            raise PromptParseError(f"the source image shows {len(anchors)} {spec.anchor[0]} {spec.anchor[1]}s, not 1")
        if targets:
            raise PromptParseError(f"the source image already shows a {name}")
        target = None
        others = list(source.objects)
    else:
        if len(targets) != 1:
            raise PromptParseError(f"the source image shows {len(targets)} {name}s, not 1")
        target = targets[0]
        others = [o for o in source.objects if o is not target]
    out = list(reading.objects)
    claimed: list[Detected] = []

    def take(key: tuple[str, str], x: float | None = None, y: float | None = None) -> Detected | None:
        cands = [o for o in out if o.key == key and o not in claimed and (x is None or _near(o, x, y, tol))]
        if not cands:
            return None
        best = min(cands, key=lambda o: (o.cx - (x or 0)) ** 2 + (o.cy - (y or 0)) ** 2)
        claimed.append(best)
        return best

    at = [o for o in out if target is not None and _near(o, target.cx, target.cy, tol)]
    if spec.op in ("recolour", "reshape"):
        new_key = (spec.new_colour or spec.colour, spec.new_shape or spec.shape)
        new = f"{new_key[0]} {new_key[1]}"
        got = take(new_key, target.cx, target.cy)
        if got:
            msg = ""
        elif any(o.key == target.key for o in at):
            msg = f"the {name} is still {spec.colour if spec.op == 'recolour' else 'a ' + spec.shape}, " \
                  f"not {spec.new_colour or 'a ' + spec.new_shape}"
        elif at:
            msg = f"the {name} became a {at[0].describe()}, not a {new}"
        else:
            msg = f"there is no {new} where the {name} was"
        facts.append(Fact("instruction", ins, f"the {name} is now a {new}", not msg, msg))
        left = [o for o in out if o.key == target.key]
        msg = f"a {name} is still there" if left else ""
        facts.append(Fact("instruction", ins, f"no {name} left", not msg, msg))
    elif spec.op == "remove":
        left = [o for o in out if o.key == target.key]
        msg = f"the {name} was not removed" if left else ""
        facts.append(Fact("instruction", ins, f"the {name} is gone", not msg, msg))
    else:  # add
        anchor = next(o for o in source.objects if o.key == spec.anchor)
        added = [o for o in out if o.key == (spec.colour, spec.shape)]
        claimed.extend(added)
        msg = "" if added else f"no {name} was added"
        facts.append(Fact("instruction", ins, f"a {name} was added", not msg, msg))
        wrong = [o for o in added if o.size != spec.size]
        msg = "" if added and not wrong else (f"the added {name} is {wrong[0].size}, not {spec.size}" if wrong
                                              else f"no added {name} to be {spec.size}")
        facts.append(Fact("instruction", ins, f"the {name} is {spec.size}", not msg, msg))
        alabel = f"{spec.anchor[0]} {spec.anchor[1]}"
        ok = bool(added) and all(_holds(spec.rel, o, anchor) for o in added)
        msg = "" if ok else (f"the added {name} is not {spec.rel} the {alabel}" if added
                             else f"no added {name} to place")
        facts.append(Fact("instruction", ins, f"the {name} is {spec.rel} the {alabel}", not msg, msg))
    for o in others:
        got = take(o.key, o.cx, o.cy)
        msg = ""
        if got is None:
            there = [p for p in out if p not in claimed and _near(p, o.cx, o.cy, tol)]
            if there and there[0].shape == o.shape:
                msg = f"the {o.describe()} is now {there[0].colour}"
            elif there:
                msg = f"the {o.describe()} became a {there[0].describe()}"
            elif any(p.key == o.key for p in out):
                msg = f"the {o.describe()} moved"
            else:
                msg = f"the {o.describe()} is missing"
        elif got.size != o.size:
            msg = f"the {o.describe()} is {got.size}, not {o.size}"
        facts.append(Fact("preserved", keep, f"the {o.describe()} is unchanged", not msg, msg))
    bg = source.background or "white"
    msg = "" if reading.background == bg else f"the background changed from {bg} to {reading.background}"
    facts.append(Fact("background", keep, f"{bg} background kept", not msg, msg))
    extra = [o for o in out if o not in claimed and not (target is not None and o.key == target.key)]
    msg = f"unexpected {', '.join(o.describe() for o in extra[:2])}" if extra else ""
    facts.append(Fact("no_extra", keep, "nothing else changed", not msg, msg))
    return facts


# ----------------------------------------------------------------------------------------------------------------
# Scores and the judge backend
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Verification:
    """Per-fact results of one item, the scores and feedback per dimension."""

    facts: list[Fact]
    scores: dict[str, float] = field(default_factory=dict)
    feedback: dict[str, str] = field(default_factory=dict)

    @property
    def all_passed(self) -> bool:
        return all(f.passed for f in self.facts)

    @property
    def fact_share(self) -> float:
        """The share of the item's facts that hold (partial credit; 0 for an item with no facts)."""
        return sum(f.passed for f in self.facts) / max(1, len(self.facts))

    @property
    def failed(self) -> list[Fact]:
        return [f for f in self.facts if not f.passed]


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _clip_feedback(text: str, limit: int = FEEDBACK_MAX_CHARS) -> str:
    text = text.replace('"', "'").replace("\\", "/")
    return text if len(text) <= limit else text[: limit - 3].rstrip(" ;,") + "..."


def quality_score(reading: Reading) -> tuple[int, str]:
    score = _round(SCORE_MAX * max(0.0, 1.0 - reading.unexplained / UNEXPLAINED_ZERO))
    msg = f"{100 * (1 - reading.unexplained):.0f}% of the image is background or recognised objects"
    if reading.blobs:
        msg += f"; {reading.blobs} unrecognised blob{'s' if reading.blobs > 1 else ''}"
    return min(SCORE_MAX, score), msg


def score_facts(facts: list[Fact], dimensions: Sequence[str], reading: Reading) -> Verification:
    v = Verification(facts)
    for dim in dimensions:
        if dim in ("visual_quality", "aesthetics"):
            score, msg = quality_score(reading)
            if dim == "aesthetics":
                msg = "not judged beyond cleanliness: " + msg
            v.scores[dim], v.feedback[dim] = float(score), _clip_feedback(msg)
            continue
        mine = [f for f in facts if f.dimension == dim]
        if not mine:
            raise PromptParseError(f"the verifier has no facts for dimension {dim!r}")
        passed = sum(f.passed for f in mine)
        score = _round(SCORE_MAX * passed / len(mine))
        v.scores[dim] = float(score if passed == len(mine) else min(score, SCORE_MAX - 1))  # 5 only when all hold
        failed = [f.message for f in mine if not f.passed]
        v.feedback[dim] = _clip_feedback("; ".join(failed) if failed else
                                         f"all {len(mine)} stated facts hold")
    return v


def verify(item: JudgeItem, dimensions: Sequence[str] | None = None) -> Verification:
    """Check every fact of a prepared item (RGB PIL images); :class:`PromptParseError` when the prompt (or its
    source / references) cannot be read as the world's grammar."""
    from labelers.rubrics import load_rubric

    dims = list(dimensions) if dimensions is not None else list(load_rubric(item.task).dimension_names)
    reading = detect(item.image)
    if item.task == "t2i":
        facts = check_t2i(parse_t2i(item.text), reading)
    elif item.task == "edit":
        facts = check_edit(parse_edit(item.text), detect(item.source_image), reading)
    elif item.task == "multi_ref":
        spec = parse_multi_ref(item.text, len(item.reference_images))
        refs = [read_reference(im, i) for i, im in enumerate(item.reference_images)]
        facts = check_multi_ref(spec, refs, reading)
    else:
        raise PromptParseError(f"unknown task {item.task!r}")
    return score_facts(facts, dims, reading)


class VerifierJudge(JudgeBase):
    """The verifier as a judge backend (``judge.backend: verifier``): same ``judge(items)`` results as the VLM
    judges; ``judge_id`` hashes ``verifier-v<VERSION>`` and the rubric. Deterministic, CPU only, no model."""

    def __init__(self, rubric_dir: str | Path | None = None, batch_size: int = 64, max_retries: int = 0,
                 feedback_max_chars: int = FEEDBACK_MAX_CHARS):
        self.model_ref = f"verifier-v{VERIFIER_VERSION}"
        self.rubric_dir = rubric_dir
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.feedback_max_chars = feedback_max_chars

    def setup(self) -> VerifierJudge:
        return self

    def teardown(self) -> None:
        pass

    def judge_id_for(self, task: str) -> str:
        return judge_id(self.model_ref, self.rubric(task))

    def verify(self, item: JudgeItem) -> Verification:
        prepared, err = prepare_item(item)
        if err:
            raise PromptParseError(err)
        return verify(prepared, self.rubric(item.task).dimension_names)

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        out = []
        for item in items:
            prepared, err = prepare_item(item)
            if err:
                out.append(JudgeResult(key=item.key, status=STATUS_IMAGE_ERROR, error=err))
                continue
            try:
                v = verify(prepared, self.rubric(prepared.task).dimension_names)
            except PromptParseError as e:
                out.append(JudgeResult(key=item.key, status=STATUS_PARSE_ERROR, error=e.reason, attempts=1))
                continue
            except Exception as e:  # noqa: BLE001 - one item must never fail the batch
                out.append(JudgeResult(key=item.key, status=STATUS_PARSE_ERROR, attempts=1,
                                       error=f"verifier failed ({type(e).__name__}: {str(e)[:120]})"))
                continue
            feedback = {d: _clip_feedback(t, self.feedback_max_chars) for d, t in v.feedback.items()}
            raw = json.dumps({d: {"score": int(v.scores[d]), "feedback": feedback[d]} for d in v.scores})
            out.append(JudgeResult(key=item.key, status=STATUS_OK, scores=dict(v.scores), feedback=feedback,
                                   raw=raw, attempts=1))
        return out
