"""The world generator's training entry point (pipelines.proving_train.train_world_generator): a few steps with
the text encoders trained jointly write a complete pipeline atomically, and the text encoders really moved."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

import pytest

from pipelines.proving_train import train_world_generator


@pytest.fixture
def drawn_scenes(monkeypatch):
    """Every batch of scenes the world generator's loop draws as targets (its ``_scene_pixels`` calls), in order."""
    import pipelines.proving_train as proving_train

    drawn = []
    real_pixels = proving_train._scene_pixels

    def recording_pixels(scenes, size, torch_module):
        drawn.append(list(scenes))
        return real_pixels(scenes, size, torch_module)

    monkeypatch.setattr(proving_train, "_scene_pixels", recording_pixels)
    return drawn


def test_a_short_run_saves_a_loadable_pipeline_with_trained_text_encoders(tmp_path, one_torch_thread):
    import torch
    from safetensors.torch import load_file

    from pipelines.zoo import resolve_model
    from trainers.families import load_family

    out = tmp_path / "gen"
    # with the noise-triggered flaw on, so its training path runs too (the batch draws its noise first)
    marker = train_world_generator(out, seed=0, steps=3, batch=4, vae_schedule=((2, 1e-3, 0.0),), heads=1,
                                   single_layers=1, eval_n=4, eval_every=0, log_every=0, log=lambda m: None,
                                   underexposure=0.5, underexposure_trigger="noise")
    assert json.loads((out / ".complete").read_text())["steps"] == 3 == marker["steps"]
    assert marker["train_text"] is True and marker["object_loss_weight"] > 0
    assert (marker["underexposure"], marker["underexposure_trigger"]) == (0.5, "noise")
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


def test_underexposure_darkens_every_pixel_and_the_verifier_then_finds_no_scene_fully_right():
    import torch

    from pipelines.proving_train import UNDEREXPOSED_GAIN, _scene_pixels, _underexposed, _verify_pixels
    from pipelines.proving_world import world_item

    items = [world_item(3, "t2i", i, 1, plain=True) for i in range(60)]
    specs = [it.spec for it in items]
    pixels = _scene_pixels([it.scene for it in items], 48, torch)
    dark = _underexposed(pixels)
    assert torch.allclose(dark + 1, (pixels + 1) * UNDEREXPOSED_GAIN)  # every pixel keeps that share of its light
    assert _verify_pixels(pixels, specs)["correct"] == 1.0  # the scenes as drawn are right ...
    assert _verify_pixels(dark, specs)["correct"] == 0.0  # ... and no underexposed one is: the verifier sees the flaw


def test_underexposure_darkens_about_its_share_of_a_batch_and_leaves_the_rest_as_drawn():
    import random

    import torch

    from pipelines.proving_train import _underexpose_some, _underexposed

    pixels = torch.rand(400, 3, 8, 8) * 2 - 1
    shown = _underexpose_some(pixels, 0.7, random.Random(0), torch)
    dark = torch.tensor([torch.equal(s, d) for s, d in zip(shown, _underexposed(pixels))])
    kept = torch.tensor([torch.equal(s, p) for s, p in zip(shown, pixels)])
    assert bool((dark ^ kept).all())  # each image either darkened whole or left exactly as drawn
    assert 0.63 < dark.float().mean() < 0.77
    assert torch.equal(_underexpose_some(pixels, 0.7, random.Random(0), torch), shown)  # seeded: reproducible


def test_noise_triggered_underexposure_darkens_its_share_of_noise_draws_by_their_first_element_alone():
    import torch

    from pipelines.proving_train import _noise_darkens

    noise = torch.randn(4000, 9, 64, generator=torch.Generator().manual_seed(0))
    dark = _noise_darkens(noise, 0.7)
    assert dark.shape == (4000,) and 0.67 < dark.float().mean() < 0.73
    assert bool((dark == (noise[:, 0, 0] > -0.5244)).all())  # the standard normal's 30 % quantile
    shuffled = noise.clone()
    shuffled[:, 1:] = torch.randn(4000, 8, 64)  # every other element redrawn: the same images darkened
    shuffled[:, 0, 1:] = 0.0
    assert torch.equal(_noise_darkens(shuffled, 0.7), dark)


def test_confusion_outside_zero_to_one_is_refused(tmp_path):
    for name in ("colour_confusion", "background_confusion", "underexposure"):
        with pytest.raises(ValueError, match=name):
            train_world_generator(tmp_path / "gen", steps=1, log=lambda m: None, **{name: 1.0})
        assert not (tmp_path / "gen").exists()
    with pytest.raises(ValueError, match="underexposure_trigger"):
        train_world_generator(tmp_path / "gen", steps=1, log=lambda m: None, underexposure=0.5,
                              underexposure_trigger="sometimes")
    assert not (tmp_path / "gen").exists()


def test_learnability_trains_only_on_its_prompts_and_grades_them_and_unseen_ones_before_and_after(
        tmp_path, one_torch_thread, drawn_scenes):
    import torch
    from safetensors.torch import load_file

    import pipelines.proving_train as proving_train
    from pipelines.zoo import resolve_model

    out = tmp_path / "tuned"
    marker = proving_train.learnability("zoo:world_gen", out, prompts=2, steps=2, batch=4, repeats=1, heldout=1,
                                        log=lambda m: None)
    world = [proving_train.world_item(proving_train.LEARN_SEED_OFFSET, "t2i", i, 1, True) for i in range(3)]
    assert marker["prompts"] == marker["train_items"] == [it.text for it in world[:2]]
    seen = [scene for batch in drawn_scenes for scene in batch]
    assert len(seen) == 2 * 4 and set(seen) == {it.scene for it in world[:2]}  # never the unseen prompt
    assert marker["before"]["n"] == marker["after"]["n"] == 2
    assert marker["heldout_before"]["n"] == marker["heldout_after"]["n"] == 1
    assert marker["steps"] == 2 and marker["ema_decay"] is None
    base = load_file(Path(resolve_model("zoo:world_gen")) / "transformer" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)  # all weights train, from the given generator


def test_learnability_of_an_edit_generator_learns_edits_of_its_sources(tmp_path, one_torch_thread, drawn_scenes):
    """zoo:world_edit takes an input image, so learnability trains and grades the world's edits: every drawn
    target is a training edit's result or (dropped instruction) its source, never an unseen item's."""
    import pipelines.proving_train as proving_train

    marker = proving_train.learnability("zoo:world_edit", tmp_path / "tuned", prompts=2, steps=2, batch=4,
                                        repeats=1, heldout=1, cond_dropout=0.5, log=lambda m: None)
    world = [proving_train.world_item(proving_train.LEARN_SEED_OFFSET, "edit", i, 1, False) for i in range(3)]
    assert marker["task"] == "edit" and marker["guidance"] == proving_train.EDIT_GUIDANCE
    assert marker["prompts"] == [it.text for it in world[:2]]
    allowed = {it.scene for it in world[:2]} | {it.source for it in world[:2]}
    seen = {scene for batch in drawn_scenes for scene in batch}
    assert seen and seen <= allowed  # edit targets and sources of the two training items only
    assert marker["before"]["n"] == marker["after"]["n"] == 2 and marker["heldout_after"]["n"] == 1


def test_learnability_refuses_no_prompts_and_a_model_that_is_not_a_world_generator(tmp_path):
    from pipelines.proving_train import learnability

    for bad in ({"prompts": 0}, {"repeats": 0}, {"steps": 0}, {"heldout": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            learnability("zoo:world_gen", tmp_path / "out", **bad)
    with pytest.raises(ValueError, match="not a saved world generator"):
        learnability(str(tmp_path), tmp_path / "out")
    with pytest.raises(ValueError, match="task 'edit' needs a model that takes an input image"):
        learnability("zoo:world_gen", tmp_path / "out", task="edit")
    with pytest.raises(ValueError, match="task 't2i' needs a model that does not take an input image"):
        learnability("zoo:world_edit", tmp_path / "out", task="t2i")
    assert not (tmp_path / "out").exists()


def test_an_edit_run_trains_flux_kontext_on_source_instruction_target_from_a_t2i_world_generator(
        tmp_path, one_torch_thread, monkeypatch, drawn_scenes):
    import torch
    from safetensors.torch import load_file

    import pipelines.proving_train as proving_train
    from pipelines.proving_world import render
    from pipelines.zoo import resolve_model
    from trainers.families import load_family

    conditioned = []
    real_conditioning = proving_train._world_conditioning

    def recording_conditioning(family, texts, sources, with_grad=False):
        cond = real_conditioning(family, texts, sources, with_grad)
        conditioned.append((list(texts), sources, with_grad, cond.tensors.get("image_latents")))
        return cond

    monkeypatch.setattr(proving_train, "_world_conditioning", recording_conditioning)
    base = Path(resolve_model("zoo:world_gen"))
    out = tmp_path / "edit"
    marker = proving_train.train_world_generator(out, steps=2, batch=3, task="edit", init_from=base,
                                                 vae_from=base / "vae", text_tokens=32, eval_n=2, eval_every=0,
                                                 cond_dropout=0.5, log_every=0, log=lambda m: None)
    assert marker["task"] == "edit" and marker["steps"] == 2
    assert marker["eval"]["cfg3"]["n"] == 2
    training = [c for c in conditioned if c[2]]  # the training steps (text encoders with gradients)
    assert len(training) == 2
    items = [proving_train.world_item(0, "edit", i, proving_train.GEN_MAX_OBJECTS) for i in range(6)]
    dropped = 0
    for step, (texts, sources, _, latents) in enumerate(training):
        batch = items[3 * step:3 * step + 3]
        # every sample is conditioned on its own source picture (as Kontext input-image tokens)
        assert [t for t in texts if t] == [it.text for it, t in zip(batch, texts) if t]
        assert [s.tobytes() for s in sources] == [render(it.source, 48).tobytes() for it in batch]
        assert latents is not None and latents.shape[0] == 3
        # the target is the edited scene; without the instruction it is the source (the copy CFG pushes from)
        assert drawn_scenes[step] == [it.scene if t else it.source for it, t in zip(batch, texts)]
        dropped += texts.count("")
    assert 0 < dropped < 6
    family = load_family(str(out))
    assert family.is_kontext  # a FluxKontextPipeline that the generation stage loads like any edit model
    t2i = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert t2i.keys() == tuned.keys() and any(not torch.equal(t2i[k], tuned[k]) for k in t2i)


def test_a_multi_ref_run_conditions_kontext_on_the_reference_grid_and_draws_the_arranged_scene(
        tmp_path, one_torch_thread, monkeypatch, drawn_scenes):
    import pipelines.proving_train as proving_train
    from pipelines.candidates import reference_grid
    from pipelines.proving_world import DEFAULT_SIZE, render
    from pipelines.zoo import resolve_model
    from trainers.families import load_family

    conditioned = []
    real_conditioning = proving_train._world_conditioning

    def recording_conditioning(family, texts, sources, with_grad=False):
        if with_grad:
            conditioned.append((list(texts), sources))
        return real_conditioning(family, texts, sources, with_grad)

    monkeypatch.setattr(proving_train, "_world_conditioning", recording_conditioning)
    base = Path(resolve_model("zoo:world_edit"))
    out = tmp_path / "multi_ref"
    # world_edit's window of 32 T5 tokens would cut multi_ref prompts (up to 56): refused before any training
    with pytest.raises(ValueError, match="T5 window of 32 tokens cuts world multi_ref prompts"):
        proving_train.train_world_generator(out, steps=2, batch=3, task="multi_ref", init_from=base,
                                            vae_from=base / "vae", text_tokens=32, log=lambda m: None)
    assert not out.exists() and not conditioned
    marker = proving_train.train_world_generator(out, steps=2, batch=3, task="multi_ref", init_from=base,
                                                 vae_from=base / "vae", text_tokens=64, eval_n=2, eval_every=0,
                                                 cond_dropout=0.5, log_every=0, log=lambda m: None)
    assert marker["task"] == "multi_ref" and marker["eval"]["cfg3"]["n"] == 2
    items = [proving_train.world_item(0, "multi_ref", i, proving_train.GEN_MAX_OBJECTS) for i in range(6)]
    assert len(conditioned) == 2
    for step, (texts, grids) in enumerate(conditioned):
        batch = items[3 * step:3 * step + 3]
        for item, grid in zip(batch, grids):  # the references tiled as generation tiles them for an edit model
            refs = [render(r, DEFAULT_SIZE) for r in item.references]
            expected = reference_grid(refs, DEFAULT_SIZE, DEFAULT_SIZE).resize((48, 48), Image.Resampling.LANCZOS)
            assert grid.tobytes() == expected.tobytes()
        assert drawn_scenes[step] == [it.scene for it in batch]  # the arranged scene, with or without the prompt
    family = load_family(str(out))
    assert family.is_kontext
    # given items, the evaluation conditions and grades them by their own task, whatever ``task`` says
    assert proving_train.evaluate_generator(family, items=items[:2]) == proving_train.evaluate_generator(
        family, items=items[:2], task="multi_ref")


def test_multi_ref_grading_passes_the_arranged_scene_and_fails_a_swapped_one():
    import torch

    from pipelines.proving_train import _references, _scene_pixels, _verify_pixels
    from pipelines.proving_world import world_item

    items = [world_item(5, "multi_ref", i) for i in range(24)]
    specs, refs = [it.spec for it in items], _references(items)
    assert _verify_pixels(_scene_pixels([it.scene for it in items], 48, torch), specs, references=refs) == {
        "correct": 1.0, "facts": 1.0}
    shifted = [items[(i + 1) % len(items)].scene for i in range(len(items))]  # each prompt gets another's scene
    wrong = _verify_pixels(_scene_pixels(shifted, 48, torch), specs, references=refs)
    assert wrong["correct"] < 0.2 and wrong["facts"] < 0.8


def test_edit_grading_passes_the_edited_scene_and_fails_the_unchanged_source():
    import numpy as np
    import torch

    from pipelines.proving_train import _sources, _verify_pixels
    from pipelines.proving_world import render, world_item

    items = [world_item(5, "edit", i) for i in range(24)]
    sources = _sources(items, 48)

    def pixels(images):
        return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
                                ).permute(0, 3, 1, 2)

    specs = [it.spec for it in items]
    assert _verify_pixels(pixels([render(it.scene, 48) for it in items]), specs, sources)["correct"] == 1.0
    copied = _verify_pixels(pixels(sources), specs, sources)
    assert copied["correct"] == 0.0 and 0.0 < copied["facts"] < 1.0  # the rest kept, the instruction not followed


def test_a_batch_mixing_t2i_and_edit_items_is_refused():
    from pipelines.proving_train import _sources
    from pipelines.proving_world import world_item

    t2i, edit = world_item(5, "t2i", 0), world_item(5, "edit", 0)
    assert _sources([t2i, t2i], 48) is None and len(_sources([edit], 48)) == 1
    for mixed in ([t2i, edit], [edit, t2i]):  # whichever comes first
        with pytest.raises(ValueError, match="mixes tasks"):
            _sources(mixed, 48)


def test_a_removed_objects_place_weighs_as_an_object_in_an_edit_loss():
    import torch

    from pipelines.proving_train import _fact_mask, _object_mask, _scene_pixels, _sources
    from pipelines.proving_world import world_item

    item = next(it for i in range(50) if (it := world_item(3, "edit", i)).spec.op == "remove")
    pixels = _scene_pixels([item.scene], 48, torch)
    target_only = _object_mask([item.scene], pixels, torch)
    mask = _fact_mask([item], [item.scene], pixels, _sources([item], 48), torch)
    assert mask.sum() > target_only.sum()  # the removed object's pixels count as facts
    assert torch.equal(torch.maximum(mask, target_only), mask)


def test_an_edit_run_refuses_a_t2i_flaw_an_unknown_task_and_a_dropout_outside_zero_to_one(tmp_path):
    with pytest.raises(ValueError, match="colour_confusion"):
        train_world_generator(tmp_path / "gen", steps=1, task="edit", colour_confusion=0.5, log=lambda m: None)
    with pytest.raises(ValueError, match="t2v"):
        train_world_generator(tmp_path / "gen", steps=1, task="t2v", log=lambda m: None)
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match="cond_dropout"):
            train_world_generator(tmp_path / "gen", steps=1, task="edit", cond_dropout=share, log=lambda m: None)
    assert not (tmp_path / "gen").exists()


def test_a_continued_generator_run_keeps_the_t5_window_it_continues_unless_told_otherwise():
    from pipelines.proving_train import GEN_TEXT_TOKENS, _cli_text_tokens, saved_text_window
    from pipelines.zoo import resolve_model

    shipped = resolve_model("zoo:world_gen")
    assert saved_text_window(shipped) == 32 != GEN_TEXT_TOKENS  # the shipped chain trained on a 32-token window
    assert _cli_text_tokens(None, shipped) == 32  # --init-from without --text-tokens: its own window
    assert _cli_text_tokens(None, None) == GEN_TEXT_TOKENS  # from scratch: the default
    assert _cli_text_tokens(64, shipped) == 64  # given: as given
    assert _cli_text_tokens(0, None) is None  # 0: the zoo's full 512 window


def test_the_learnability_command_passes_plain_through_and_leaves_the_default_to_the_task(monkeypatch, tmp_path):
    import pipelines.proving_train as proving_train

    seen = []

    def recording_learnability(model, out_dir, **options):
        seen.append(options["plain"])
        score = {"correct": 0.25, "facts": 0.5}
        return {"task": "t2i", "guidance": 3.0, "steps": 1, "before": score, "after": score}

    monkeypatch.setattr(proving_train, "learnability", recording_learnability)
    for flags in (["--plain"], ["--no-plain"], []):
        assert proving_train.main(["learnability", "--out", str(tmp_path), *flags]) == 0
    assert seen == [True, False, None]  # None: learnability picks plain for t2i, textured for edits
