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
