"""The world generator's training entry point (pipelines.proving_train.train_world_generator): a few steps with
the text encoders trained jointly write a complete pipeline atomically, and the text encoders really moved."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.proving_train import train_world_generator


def test_a_short_run_saves_a_loadable_pipeline_with_trained_text_encoders(tmp_path, one_torch_thread):
    import torch
    from safetensors.torch import load_file

    from pipelines.zoo import resolve_model
    from trainers.families import load_family

    out = tmp_path / "gen"
    marker = train_world_generator(out, seed=0, steps=3, batch=4, vae_schedule=((2, 1e-3, 0.0),), heads=1,
                                   single_layers=1, eval_n=4, eval_every=0, log_every=0, log=lambda m: None)
    assert json.loads((out / ".complete").read_text())["steps"] == 3 == marker["steps"]
    assert marker["train_text"] is True and marker["object_loss_weight"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left behind
    zoo_t5 = load_file(next((Path(resolve_model("zoo:flux")) / "text_encoder_2").glob("*.safetensors")))
    ours = load_file(next((out / "text_encoder_2").glob("*.safetensors")))
    moved = [k for k in ours if k in zoo_t5 and not torch.equal(ours[k], zoo_t5[k])]
    assert moved, "the T5 encoder was trained jointly: some weights must differ from the zoo's"
    family = load_family(str(out))
    assert family.name == "flux"


def test_colour_confusion_paints_every_object_in_its_partner_colour_and_keeps_the_rest():
    from labelers.verifier import OBJECT_COLOURS
    from pipelines.proving_train import CONFUSED_COLOUR, _confused
    from pipelines.proving_world import world_item

    # a derangement of the object colours: every colour has a partner, none is its own, no two share one
    assert set(CONFUSED_COLOUR) == set(OBJECT_COLOURS) == set(CONFUSED_COLOUR.values())
    assert all(partner != colour for colour, partner in CONFUSED_COLOUR.items())
    scene = world_item(0, "t2i", 7, 3).scene
    confused = _confused(scene)
    assert [o.colour for o in confused.objects] == [CONFUSED_COLOUR[o.colour] for o in scene.objects]
    assert [(o.shape, o.size, o.cell) for o in confused.objects] == [(o.shape, o.size, o.cell) for o in scene.objects]
    assert (confused.background, confused.texture) == (scene.background, scene.texture)


def test_background_confusion_paints_the_partner_background_and_keeps_the_objects():
    from labelers.verifier import BACKGROUND_COLOURS, detect
    from pipelines.proving_train import CONFUSED_BACKGROUND, _confused_background
    from pipelines.proving_world import render, world_item

    assert set(CONFUSED_BACKGROUND) == set(BACKGROUND_COLOURS) == set(CONFUSED_BACKGROUND.values())
    assert all(partner != colour for colour, partner in CONFUSED_BACKGROUND.items())
    scene = world_item(0, "t2i", 7, 3, plain=True).scene
    confused = _confused_background(scene)
    assert confused.background == CONFUSED_BACKGROUND[scene.background]
    assert confused.objects == scene.objects and confused.texture == scene.texture
    assert detect(render(confused, 48)).background == confused.background  # the verifier sees the flaw


def test_confusion_outside_zero_to_one_is_refused(tmp_path):
    import pytest

    for name in ("colour_confusion", "background_confusion"):
        with pytest.raises(ValueError, match=name):
            train_world_generator(tmp_path / "gen", steps=1, log=lambda m: None, **{name: 1.0})
        assert not (tmp_path / "gen").exists()


def test_learnability_trains_only_on_its_prompts_and_grades_them_and_unseen_ones_before_and_after(
        tmp_path, one_torch_thread, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import pipelines.proving_train as proving_train
    from pipelines.zoo import resolve_model

    seen = []
    real_pixels = proving_train._scene_pixels

    def recording_pixels(scenes, size, torch_module):
        seen.extend(scenes)
        return real_pixels(scenes, size, torch_module)

    monkeypatch.setattr(proving_train, "_scene_pixels", recording_pixels)
    out = tmp_path / "tuned"
    marker = proving_train.learnability("zoo:world_gen", out, prompts=2, steps=2, batch=4, repeats=1, heldout=1,
                                        log=lambda m: None)
    world = [proving_train.world_item(proving_train.LEARN_SEED_OFFSET, "t2i", i, 1, True) for i in range(3)]
    assert marker["prompts"] == marker["train_items"] == [it.text for it in world[:2]]
    assert len(seen) == 2 * 4 and set(seen) == {it.scene for it in world[:2]}  # never the unseen prompt
    assert marker["before"]["n"] == marker["after"]["n"] == 2
    assert marker["heldout_before"]["n"] == marker["heldout_after"]["n"] == 1
    assert marker["steps"] == 2 and marker["ema_decay"] is None
    base = load_file(Path(resolve_model("zoo:world_gen")) / "transformer" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)  # all weights train, from the given generator


def test_learnability_refuses_no_prompts_and_a_model_that_is_not_a_world_generator(tmp_path):
    import pytest

    from pipelines.proving_train import learnability

    for bad in ({"prompts": 0}, {"repeats": 0}, {"steps": 0}, {"heldout": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            learnability("zoo:world_gen", tmp_path / "out", **bad)
    with pytest.raises(ValueError, match="not a saved world generator"):
        learnability(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
