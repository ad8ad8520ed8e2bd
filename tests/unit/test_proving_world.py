"""The proving ground's procedural world (pipelines/proving_world.py): deterministic scenes, renders and batches
whose prompts parse back to exactly the facts the world stated."""

import json

import numpy as np
import pytest

from labelers.verifier import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    EditSpec,
    MultiRefSpec,
    T2ISpec,
    parse_prompt,
)
from pipelines.proving_world import (
    Obj,
    Scene,
    png_bytes,
    render,
    world_item,
    world_items,
    write_batch,
)

TASKS = ("t2i", "edit", "multi_ref")


def test_palette_backgrounds_are_never_object_colours():
    objs = np.array(list(OBJECT_COLOURS.values()), float)
    bgs = np.array(list(BACKGROUND_COLOURS.values()), float)
    pairwise = np.linalg.norm(objs[:, None] - objs[None], axis=-1) + np.eye(len(objs)) * 1e9
    assert pairwise.min() > 110
    assert np.linalg.norm(objs[:, None] - bgs[None], axis=-1).min() > 110


@pytest.mark.parametrize("task", TASKS)
def test_world_is_a_function_of_the_seed(task):
    a, b = world_items(7, task, 20), world_items(7, task, 20)
    assert [(i.text, i.spec, i.scene, i.source, i.references) for i in a] == \
           [(i.text, i.spec, i.scene, i.source, i.references) for i in b]
    assert all(png_bytes(render(x.scene)) == png_bytes(render(y.scene)) for x, y in zip(a[:5], b[:5]))
    other = world_items(8, task, 20)
    assert [i.text for i in other] != [i.text for i in a] or [i.scene for i in other] != [i.scene for i in a]


@pytest.mark.parametrize("task", TASKS)
def test_every_prompt_parses_back_to_its_facts(task):
    items = world_items(0, task, 200)
    for it in items:
        spec = parse_prompt(task, it.text, len(it.references) or None)
        assert spec == it.spec, it.text
        assert isinstance(spec, {"t2i": T2ISpec, "edit": EditSpec, "multi_ref": MultiRefSpec}[task])
    if task == "edit":  # every edit operation is drawn
        assert {it.spec.op for it in items} == {"recolour", "remove", "reshape", "add"}
    if task == "multi_ref":
        assert {it.spec.n_refs for it in items} == {2, 3, 4}
        assert all(len(r.objects) == 1 for it in items for r in it.references)
    if task == "t2i":
        assert {len(it.spec.groups) for it in items} == {1, 2, 3}
        assert any(it.spec.cell is not None for it in items) and any(g.size for it in items for g in it.spec.groups)
        assert all(1 <= len(it.scene.objects) <= 3 for it in items)


def test_scenes_are_well_formed():
    for task in TASKS:
        for it in world_items(3, task, 100):
            for scene in [it.scene, *([it.source] if it.source else []), *it.references]:
                cells = [o.cell for o in scene.objects]
                assert len(set(cells)) == len(cells)  # one object per grid cell
                assert scene.background in BACKGROUND_COLOURS and scene.texture in ("plain", "noise", "stripes")


def test_render_is_aliasing_free_and_textured_background_stays_near_its_colour():
    scene = Scene((Obj("red", "circle", "large", (0, 0)), Obj("blue", "triangle", "small", (2, 2))), "grey",
                  "noise", 5)
    pix = np.asarray(render(scene)).reshape(-1, 3).astype(int)
    obj = np.array(list(OBJECT_COLOURS.values()))
    is_obj = (pix[:, None] == obj[None]).all(-1).any(-1)
    bg_dist = np.abs(pix[~is_obj] - np.array(BACKGROUND_COLOURS["grey"])).max()
    assert is_obj.sum() > 100 and bg_dist <= 10  # no blended edge pixels: every pixel is an object's or the bg's
    with pytest.raises(ValueError):
        render(scene, 32)


def test_write_batch_writes_the_prompt_format_with_relative_images(tmp_path):
    path, items = write_batch(tmp_path / "inbox", seed=4, n_per_task=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(items) and {r["task"] for r in rows} == set(TASKS)
    for row, it in zip(rows, items):
        assert row["text"] == it.text and row["split"] in ("train", "heldout")
        if row["task"] == "edit":
            assert row["source_image"].startswith("images/") and (path.parent / row["source_image"]).is_file()
        else:
            assert row["source_image"] is None
        if row["task"] == "multi_ref":
            assert 2 <= len(row["reference_images"]) <= 4 and row["reference_types"] == ["object"] * len(
                row["reference_images"])
            assert all((path.parent / r).is_file() for r in row["reference_images"])
    again, _ = write_batch(tmp_path / "again", seed=4, n_per_task=6)
    assert again.read_bytes() == path.read_bytes()
    assert sorted(p.read_bytes() for p in (tmp_path / "again" / "images").iterdir()) == \
           sorted(p.read_bytes() for p in (tmp_path / "inbox" / "images").iterdir())


def test_write_batch_is_accepted_by_the_prompt_ingest(tmp_path):
    """Every row the world writes passes the project's prompt ingest (no drops, no duplicates)."""
    from pipelines.prompts import ingest_prompt_file
    from pipelines.sample_data import validate_row

    path, items = write_batch(tmp_path / "inbox", seed=1, n_per_task=10)
    for line in path.read_text().splitlines():
        validate_row(json.loads(line))
    result = ingest_prompt_file(path, tmp_path / "store")
    assert not result.drops, result.problems
    assert len(result.rows) == len(items)


def test_world_item_index_is_independent_of_batch_size():
    assert world_item(2, "edit", 5).text == world_items(2, "edit", 9)[5].text


def test_plain_drops_only_the_textures():
    from pipelines.proving_world import world_item

    for task in ("t2i", "edit", "multi_ref"):
        for i in range(20):
            textured, plain = world_item(4, task, i), world_item(4, task, i, plain=True)
            assert plain.text == textured.text and plain.spec == textured.spec
            scenes = [plain.scene, *plain.references] + ([plain.source] if plain.source else [])
            assert all(s.texture == "plain" for s in scenes)
            assert plain.scene.objects == textured.scene.objects
            assert plain.scene.background == textured.scene.background
