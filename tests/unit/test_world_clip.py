"""The tiny world CLIP (pipelines.proving_train): a short seeded training run beats the random zoo clip on the
held-out world, and the saved model loads and scores through ClipScorer like the zoo's clip."""

from __future__ import annotations

import json

import pytest

from pipelines.proving_train import evaluate_clip, swapped_prompt, train_world_clip
from pipelines.proving_world import render, world_item

STEPS = 150
BATCH = 64
EVAL_N = 128


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("world_clip") / "world_clip"
    marker = train_world_clip(out, seed=0, steps=STEPS, batch=BATCH, eval_n=EVAL_N, eval_baseline=True,
                              log_every=0)
    return out, marker


def test_swapped_prompt_states_a_false_fact():
    import random

    from labelers.verifier import parse_t2i

    rng = random.Random(0)
    for i in range(40):
        item = world_item(7, "t2i", i)
        text = swapped_prompt(item.spec, rng)
        assert text != item.text
        swapped = parse_t2i(text)  # still in the grammar
        keys = {g.key for g in swapped.groups}
        assert keys != {o.key for o in item.scene.objects}
        assert len(swapped.groups) == len(item.spec.groups)


def test_trained_clip_beats_random_zoo_clip(trained):
    _, marker = trained
    ev, base = marker["eval"], marker["eval_random_zoo_clip"]
    assert marker["steps"] == STEPS and marker["seed"] == 0
    # Chance: retrieval 1/8, swap 0.5, ref 0.5; the random clip sits near chance.
    assert ev["retrieval"] >= 0.45 and ev["retrieval"] >= base["retrieval"] + 0.2, (ev, base)
    assert ev["swap"] >= 0.6 and ev["swap"] >= base["swap"] + 0.08, (ev, base)
    assert ev["clip_t_pos"] > ev["clip_t_neg"] + 0.1, ev


def test_saved_model_loads_and_scores_through_clip_scorer(trained, one_torch_thread):
    from labelers.clip_scorer import ClipScorer
    from pipelines.zoo import MARKER

    out, marker = trained
    assert json.loads((out / MARKER).read_text()) == marker
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_model.safetensors").is_file()
    assert not list(out.parent.glob(".world_clip.tmp-*"))
    scorer = ClipScorer(str(out)).setup()
    item = world_item(123, "multi_ref", 0)
    image = render(item.scene)
    refs = [render(r) for r in item.references]
    scores = scorer.score([image, image], [item.text, "a red circle on a white background"], [refs, None])
    assert -1.0 <= scores[0].clip_t <= 1.0 and len(scores[0].clip_i_per_ref) == len(refs)
    assert scores[1].clip_i is None
    # Evaluating the saved directory through ClipScorer reproduces the marker's numbers (deterministic).
    assert evaluate_clip(str(out), seed=0, n=EVAL_N, scorer=scorer) == marker["eval"]
