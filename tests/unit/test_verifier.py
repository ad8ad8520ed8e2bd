"""The proving-ground verifier (labelers/verifier.py): right on ground-truth renders of the world, wrong for the
right reason on deliberately wrong images, and a judge backend with the judge's contract."""

import random
from dataclasses import replace

import pytest

from labelers.judge import JudgeItem, judge_id, parse_judgement
from labelers.rubrics import load_rubric
from labelers.verifier import (
    OBJECT_COLOURS,
    SHAPES,
    EditSpec,
    PromptParseError,
    VerifierJudge,
    detect,
    edit_text,
    parse_prompt,
    verify,
)
from pipelines.proving_world import Obj, Scene, apply_edit, render, world_items

TASKS = ("t2i", "edit", "multi_ref")


def item_for(task, text, scene, source=None, refs=(), key="k", size=64):
    return JudgeItem(key, task, text, render(scene, size), render(source, size) if source else None,
                     tuple(render(r, size) for r in refs), ("object",) * len(refs))


def wi_item(it, scene=None, size=64):
    return item_for(it.task, it.text, scene or it.scene, it.source, it.references, size=size)


def failed(v):
    return [f.message for f in v.failed]


# ------------------------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("task", TASKS)
def test_verifier_is_right_on_ground_truth_renders(task):
    items = world_items(11, task, 150)
    passed = sum(verify(wi_item(it)).all_passed for it in items)
    accuracy = passed / len(items)
    print(f"\nverifier ground-truth accuracy, {task}: {passed}/{len(items)} = {accuracy:.1%}")
    assert accuracy >= 0.99
    judged = VerifierJudge().judge([wi_item(it) for it in items[:20]])
    assert all(r.ok and set(r.scores.values()) == {5.0} for r in judged)


@pytest.mark.parametrize("size", [48, 96])
def test_verifier_reads_every_object_at_other_image_sizes(size):
    for task in TASKS:
        for it in world_items(5, task, 30):
            reading = detect(render(it.scene, size))
            assert sorted((o.colour, o.shape, o.size, o.cell) for o in reading.objects) == \
                   sorted((o.colour, o.shape, o.size, o.cell) for o in it.scene.objects)
            assert reading.background == it.scene.background and reading.unexplained < 1e-3
            assert verify(wi_item(it, size=size)).all_passed


# ------------------------------------------------------------------------------------------- wrong images, t2i
SCENE = Scene((Obj("red", "circle", "large", (1, 0)), Obj("red", "circle", "large", (0, 0)),
               Obj("blue", "square", "small", (1, 2))), "white", "noise", 3)
TEXT = "two large red circles left of a small blue square on a white background"


def t2i(scene, text=TEXT):
    return verify(item_for("t2i", text, scene))


def with_obj(scene, i, **changes):
    objs = list(scene.objects)
    objs[i] = replace(objs[i], **changes)
    return replace(scene, objects=tuple(objs))


def test_t2i_ground_truth_passes_every_fact():
    v = t2i(SCENE)
    assert v.all_passed and v.scores == {"prompt_alignment": 5.0, "visual_quality": 5.0, "aesthetics": 5.0}
    assert {f.kind for f in v.facts} == {"count", "size", "relation", "background", "no_extra"}


def test_recoloured_object_is_named_with_its_colour():
    v = t2i(with_obj(SCENE, 0, colour="blue"))
    assert "the circle is blue, not red" in failed(v)
    assert v.scores["prompt_alignment"] < 5 and "the circle is blue, not red" in v.feedback["prompt_alignment"]


def test_missing_object_is_counted():
    v = t2i(replace(SCENE, objects=SCENE.objects[1:]))
    assert failed(v) == ["expected 2 red circles, found 1"]


def test_wrong_shape_is_named():
    v = t2i(with_obj(SCENE, 2, shape="triangle"))
    assert "the blue object is a triangle, not a square" in failed(v)


def test_swapped_positions_fail_the_relation():
    swapped = with_obj(with_obj(SCENE, 0, cell=(1, 2)), 2, cell=(1, 0))
    assert failed(t2i(swapped)) == ["the red circle is not left of the blue square"]


def test_wrong_size_background_and_extra_object():
    assert failed(t2i(with_obj(SCENE, 2, size="large"))) == ["the blue square is large, not small"]
    assert failed(t2i(replace(SCENE, background="black"))) == ["the background is black, not white"]
    extra = replace(SCENE, objects=SCENE.objects + (Obj("green", "triangle", "small", (2, 1)),))
    assert failed(t2i(extra)) == ["unexpected green triangle"]


def test_lone_object_in_the_wrong_cell():
    scene = Scene((Obj("yellow", "triangle", "large", (0, 0)),), "grey")
    text = "a yellow triangle in the top left on a grey background"
    assert t2i(scene, text).all_passed
    assert failed(t2i(with_obj(scene, 0, cell=(2, 2)), text)) == ["the yellow triangle is in the bottom right, "
                                                                  "not the top left"]


def _t2i_perturbations(it, rng):
    """Deliberately wrong scenes for a t2i item: (kind, scene) pairs that contradict at least one stated fact."""
    scene, keys = it.scene, {o.key for o in it.scene.objects}
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    out = [("missing", replace(scene, objects=scene.objects[:i] + scene.objects[i + 1:]))]
    colours = [c for c in OBJECT_COLOURS if (c, o.shape) not in keys]
    out.append(("recoloured", with_obj(scene, i, colour=rng.choice(colours))))
    shapes = [s for s in SHAPES if (o.colour, s) not in keys]
    if shapes:
        out.append(("reshaped", with_obj(scene, i, shape=rng.choice(shapes))))
    if it.spec.relations:  # swap one object of each side of a stated relation
        r = it.spec.relations[0]
        ka, kb = it.spec.groups[r.a].key, it.spec.groups[r.b].key
        ia = next(k for k, x in enumerate(scene.objects) if x.key == ka)
        ib = next(k for k, x in enumerate(scene.objects) if x.key == kb)
        out.append(("swapped", with_obj(with_obj(scene, ia, cell=scene.objects[ib].cell), ib,
                                        cell=scene.objects[ia].cell)))
    return out


def test_verifier_catches_perturbed_t2i_scenes():
    rng = random.Random(0)
    caught, total = {}, {}
    for it in world_items(12, "t2i", 120):
        for kind, scene in _t2i_perturbations(it, rng):
            total[kind] = total.get(kind, 0) + 1
            v = verify(wi_item(it, scene))
            caught[kind] = caught.get(kind, 0) + (not v.all_passed and v.scores["prompt_alignment"] < 5)
    print("\nverifier catches wrong t2i images:", {k: f"{caught[k]}/{total[k]}" for k in total})
    assert all(caught[k] == total[k] for k in total)


# ------------------------------------------------------------------------------------------- wrong images, edit
SOURCE = Scene((Obj("red", "circle", "large", (1, 0)), Obj("blue", "square", "small", (1, 2)),
                Obj("purple", "triangle", "small", (2, 1))), "grey", "stripes", 1)


def edit(spec, output, cell=None):
    return verify(item_for("edit", edit_text(spec), output, SOURCE))


@pytest.mark.parametrize("spec", [
    EditSpec("recolour", "red", "circle", new_colour="green"),
    EditSpec("reshape", "red", "circle", new_shape="square"),
    EditSpec("remove", "blue", "square"),
])
def test_edit_that_did_nothing_fails_the_instruction(spec):
    assert edit(spec, apply_edit(SOURCE, spec)).all_passed
    v = edit(spec, SOURCE)
    assert v.scores["instruction_following"] == 0 and v.scores["detail_preservation"] == 5
    assert v.feedback["instruction_following"].startswith(
        {"recolour": "the red circle is still red, not green", "reshape": "the red circle is still a circle",
         "remove": "the blue square was not removed"}[spec.op])


def test_edit_that_changed_other_objects_loses_detail_preservation():
    spec = EditSpec("recolour", "red", "circle", new_colour="green")
    target = apply_edit(SOURCE, spec)
    v = edit(spec, with_obj(target, 1, colour="yellow"))
    assert v.scores["instruction_following"] == 5 and v.scores["detail_preservation"] < 5
    assert "the blue square is now yellow" in v.feedback["detail_preservation"]
    moved = edit(spec, with_obj(target, 2, cell=(0, 1)))
    assert "the purple triangle moved" in failed(moved) and moved.scores["detail_preservation"] < 5
    gone = edit(spec, replace(target, objects=target.objects[:2]))
    assert "the purple triangle is missing" in failed(gone)
    bg = edit(spec, replace(target, background="white"))
    assert failed(bg) == ["the background changed from grey to white"]


def test_edit_add_checks_presence_size_and_place():
    spec = EditSpec("add", "green", "triangle", size="small", rel="above", anchor=("blue", "square"))
    assert edit(spec, apply_edit(SOURCE, spec, (0, 2))).all_passed
    assert failed(edit(spec, apply_edit(SOURCE, spec, (2, 2)))) == ["the added green triangle is not above the "
                                                                    "blue square"]
    assert "no green triangle was added" in failed(edit(spec, SOURCE))
    big = replace(spec, size="large")
    assert failed(edit(spec, apply_edit(SOURCE, big, (0, 2)))) == ["the added green triangle is large, not small"]


def test_verifier_catches_edits_that_did_nothing_or_touched_the_rest():
    nothing = touched = touched_total = 0
    items = world_items(13, "edit", 120)
    for it in items:
        v = verify(wi_item(it, it.source))
        nothing += v.scores["instruction_following"] < 5
        others = [k for k, o in enumerate(it.scene.objects) if k < len(it.source.objects)
                  and o == it.source.objects[k] and o.key != (it.spec.colour, it.spec.shape)]
        if others:
            k = others[0]
            o = it.scene.objects[k]
            keys = {x.key for x in it.scene.objects}
            colour = next(c for c in OBJECT_COLOURS if (c, o.shape) not in keys)
            touched_total += 1
            touched += verify(wi_item(it, with_obj(it.scene, k, colour=colour))).scores["detail_preservation"] < 5
    print(f"\nedit did nothing caught {nothing}/{len(items)}; other object changed caught {touched}/{touched_total}")
    assert nothing == len(items) and touched == touched_total > 30


# ------------------------------------------------------------------------------------------- wrong images, multi_ref
REFS = (Scene((Obj("red", "circle", "large", (1, 1)),), "white"),
        Scene((Obj("blue", "square", "small", (1, 1)),), "black", "noise", 2),
        Scene((Obj("green", "triangle", "large", (1, 1)),), "grey"))
MR_TEXT = ("the object from picture 1 left of the object from picture 2, and the object from picture 3 below "
           "the object from picture 1 on a white background")
MR_SCENE = Scene((Obj("red", "circle", "large", (0, 0)), Obj("blue", "square", "small", (0, 2)),
                  Obj("green", "triangle", "large", (2, 0))), "white")


def mr(scene):
    return verify(item_for("multi_ref", MR_TEXT, scene, refs=REFS))


def test_multi_ref_reads_the_references_and_checks_the_arrangement():
    v = mr(MR_SCENE)
    assert v.all_passed and v.scores == {"reference_fidelity": 5.0, "prompt_alignment": 5.0, "visual_quality": 5.0}
    missing = mr(replace(MR_SCENE, objects=MR_SCENE.objects[:2]))
    assert "the green triangle from picture 3 is missing" in failed(missing)
    assert missing.scores["reference_fidelity"] < 5
    recoloured = mr(with_obj(MR_SCENE, 1, colour="yellow"))
    assert "the square from picture 2 is yellow, not blue" in failed(recoloured)
    swapped = mr(with_obj(with_obj(MR_SCENE, 0, cell=(0, 2)), 1, cell=(0, 0)))
    assert failed(swapped) == ["the red circle (picture 1) is not left of the blue square (picture 2)"]
    assert swapped.scores["reference_fidelity"] == 5 and swapped.scores["prompt_alignment"] < 5


def test_verifier_catches_perturbed_multi_ref_scenes():
    caught = total = 0
    for it in world_items(14, "multi_ref", 100):
        r = it.spec.relations[0]
        objs = it.scene.objects
        swapped = with_obj(with_obj(it.scene, r.a, cell=objs[r.b].cell), r.b, cell=objs[r.a].cell)
        dropped = replace(it.scene, objects=objs[1:])
        for scene in (swapped, dropped):
            total += 1
            caught += not verify(wi_item(it, scene)).all_passed
    assert caught == total


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("task,text", [
    ("t2i", "a photo of a cat"),
    ("t2i", "a red circle left of the blue square on a white background"),  # refers to nothing mentioned
    ("t2i", "two red circle on a white background"),
    ("t2i", "a red circle left of a red circle on a white background"),
    ("edit", "make the sky purple"),
    ("edit", "make the red circle red"),
    ("multi_ref", "the object from picture 1 left of the object from picture 3 on a white background"),
    ("t2i", ""),
])
def test_text_outside_the_grammar_is_a_parse_error(task, text):
    with pytest.raises(PromptParseError):
        parse_prompt(task, text, 2)


# ------------------------------------------------------------------------------------------- judge backend
def test_verifier_judge_keeps_the_judge_contract():
    judge = VerifierJudge().setup()
    t2i_items = world_items(21, "t2i", 2)
    edit_item = world_items(21, "edit", 1)[0]
    mr_item = world_items(21, "multi_ref", 1)[0]
    two_object_ref = item_for("multi_ref", MR_TEXT, MR_SCENE, refs=(REFS[0], MR_SCENE, REFS[2]), key="badref")
    items = [
        wi_item(t2i_items[0]),
        item_for("t2i", "a photo of a cat on a sofa", t2i_items[1].scene, key="unparseable"),
        wi_item(edit_item),
        JudgeItem("noimage", "t2i", t2i_items[1].text, None),
        item_for("t2i", TEXT, with_obj(SCENE, 0, colour="blue"), key="wrong"),
        two_object_ref,
        wi_item(mr_item),
    ]
    results = judge.judge(items)
    assert [r.status for r in results] == ["ok", "parse_error", "ok", "image_error", "ok", "parse_error", "ok"]
    assert [r.key for r in results] == [it.key for it in items]
    assert "not an object phrase" in results[1].error or "background" in results[1].error
    assert "reference picture 2 shows 3 recognisable objects" in results[5].error
    for it, r in zip(items, results):
        if not r.ok:
            continue
        rubric = load_rubric(it.task)
        assert list(r.scores) == list(rubric.dimension_names) == list(r.feedback)
        assert all(s in {0.0, 1.0, 2.0, 3.0, 4.0, 5.0} for s in r.scores.values())
        assert all(0 < len(f) <= 120 for f in r.feedback.values())
        assert parse_judgement(r.raw, rubric) == (r.scores, r.feedback)  # raw is a valid judgement
    wrong = results[4]
    assert wrong.scores["prompt_alignment"] < 5 and "the circle is blue, not red" in wrong.feedback["prompt_alignment"]
    for task in TASKS:
        assert judge.judge_id_for(task) == judge_id("verifier-v1", load_rubric(task))
        assert judge.judge_id_for(task) != judge_id("zoo:judge", load_rubric(task))


def test_judge_resource_picks_the_verifier_backend(tmp_path):
    from pipelines.resources import JudgeResource, ProfileResource

    profile = tmp_path / "proving.yaml"
    profile.write_text("extends: tiny\nname: proving\njudge:\n  backend: verifier\n  batch_size: 16\n"
                       "  model: ignored\n")
    judge = JudgeResource(profile=ProfileResource(name=str(profile))).judge()
    assert isinstance(judge, VerifierJudge) and judge.batch_size == 16


def test_labeling_stage_with_the_verifier_judge(tmp_path, monkeypatch):
    from labelers.clip_scorer import ClipScorer
    from labelers.stage import LabelingStage, label_columns
    from pipelines.zoo import build_zoo

    monkeypatch.setenv("PREFMILL_ZOO", str(tmp_path / "zoo"))
    build_zoo(tmp_path / "zoo", only=["clip"])
    scorer = ClipScorer("zoo:clip", cpu_threads=1).setup()
    t2i_it, edit_it, mr_it = (world_items(31, t, 1)[0] for t in TASKS)
    rows = [
        {"candidate_id": "good", "prompt_id": "p0", "task": "t2i", "text": t2i_it.text},
        {"candidate_id": "empty", "prompt_id": "p0", "task": "t2i", "text": t2i_it.text},
        {"candidate_id": "edit", "prompt_id": "p1", "task": "edit", "text": edit_it.text},
        {"candidate_id": "unchanged", "prompt_id": "p1", "task": "edit", "text": edit_it.text},
        {"candidate_id": "mr", "prompt_id": "p2", "task": "multi_ref", "text": mr_it.text,
         "reference_types": ["object"] * len(mr_it.references)},
        {"candidate_id": "cat", "prompt_id": "p3", "task": "t2i", "text": "a cat"},
    ]
    images = {"good": render(t2i_it.scene), "empty": render(replace(t2i_it.scene, objects=())),
              "edit": render(edit_it.scene), "unchanged": render(edit_it.source), "mr": render(mr_it.scene),
              "cat": render(t2i_it.scene)}
    stage = LabelingStage(VerifierJudge(), scorer)
    out = stage.process_batch(rows, images, {"p1": render(edit_it.source)},
                              {"p2": [render(r) for r in mr_it.references]})
    by = {r["candidate_id"]: r for r in out}
    assert [r["status"] for r in out] == ["ok"] * 5 + ["parse_error"]
    assert all(list(r) == label_columns() for r in out)
    assert by["good"]["prompt_alignment"] == 5 and by["empty"]["prompt_alignment"] < 5
    assert by["good"]["reward"] > by["empty"]["reward"]
    assert by["edit"]["instruction_following"] == 5 and by["unchanged"]["instruction_following"] < 5
    assert by["edit"]["reward"] > by["unchanged"]["reward"]
    assert by["mr"]["reference_fidelity"] == 5 and len(by["mr"]["clip_i_per_ref"]) == len(mr_it.references)
    assert by["cat"]["reward"] is None and by["cat"]["clip_t"] is not None and by["cat"]["error"]
    assert by["good"]["judge_id"] == VerifierJudge().judge_id_for("t2i")
