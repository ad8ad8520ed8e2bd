"""The proving ground's report pieces (pipelines/proving.py), the DPO label flip of its shuffled-label control and
the verifier reward of its upper-bound control."""

import random

import pytest
from PIL import Image

from pipelines.proving import (bootstrap_interval, best_recipe, plot_curves, prove_line, summary_table,
                               verify_rows)
from pipelines.proving_world import render, world_item
from trainers.dpo.dpo_trainer import _flipped


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_prompts():
    rng = random.Random(0)
    small = [float(rng.random() < 0.4) for _ in range(20)]
    large = [float(rng.random() < 0.4) for _ in range(400)]
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s <= sum(small) / len(small) <= hi_s
    assert lo_l <= sum(large) / len(large) <= hi_l
    assert hi_l - lo_l < hi_s - lo_s
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)


def _result(acc, lo=None, hi=None, steps=10):
    return {"accuracy": acc, "ci_low": lo if lo is not None else acc - 0.05, "ci_high": hi or acc + 0.05,
            "facts": acc, "clip_t": 0.3, "clip_i": None, "steps": steps}


def test_prove_line_names_the_best_recipe_and_leaves_controls_out_of_best():
    results = {"base": _result(0.3, steps=0), "sft": _result(0.5), "dpo": _result(0.42),
               "dpo_shuffled": _result(0.31), "grpo_verifier": _result(0.9)}
    assert best_recipe(results) == "sft"  # the verifier-reward control is an upper bound, never "best"
    line = prove_line(results)
    assert line == "prove: base=0.300 best=0.500 best_recipe=sft shuffled=0.310 verifier_reward=0.900"
    table = summary_table(results)
    assert "| sft | 0.500 | [0.450, 0.550] | +20.0 pt |" in table
    assert table.count("\n") == len(results) + 1


def test_verify_rows_grades_ground_truth_right_and_a_wrong_image_wrong():
    items = [world_item(5, "t2i", i, max_objects=1) for i in range(4)]
    rows = [{"candidate_id": str(i), "task": "t2i", "text": it.text} for i, it in enumerate(items)]
    right = verify_rows(rows, [render(it.scene, 48) for it in items])
    assert all(r["correct"] and r["facts"] == 1.0 for r in right)
    blank = Image.new("RGB", (48, 48), (240, 240, 235))
    wrong = verify_rows(rows, [blank] * len(rows))
    assert not any(r["correct"] for r in wrong) and all(r["failed"] for r in wrong)


def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "plot.png"
    plot_curves({"sft": [(0, 0.3), (60, 0.4), (120, 0.5)], "dpo": [(0, 0.3), (120, 0.35)]}, 0.3, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (720, 420)
        # something was drawn in the recipes' colours
        assert len(set(im.convert("RGB").getdata())) > 4


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_label_flip_swaps_the_asked_share_of_pairs_deterministically(share):
    pairs = [(None, None, f"caption {i}", 1.0, 0.0, {"__key__": f"pair-{i}"}) for i in range(2000)]
    flips = [_flipped(p, 0, share) for p in pairs]
    assert flips == [_flipped(p, 0, share) for p in pairs]  # same pairs every epoch / resume
    assert abs(sum(flips) / len(flips) - share) < 0.04
    if 0 < share < 1:
        assert flips != [_flipped(p, 1, share) for p in pairs]  # the seed picks which


def test_grpo_verifier_reward_is_the_share_of_true_facts(monkeypatch):
    from trainers.grpo.grpo_config import GRPOConfig
    from trainers.grpo.grpo_trainer import ClipReward, VerifierReward

    items = [world_item(9, "t2i", i, max_objects=1) for i in range(3)]
    rows = [{"task": "t2i", "text": it.text} for it in items]
    images = [render(items[0].scene, 48), Image.new("RGB", (48, 48), (25, 25, 25)), render(items[2].scene, 48)]
    monkeypatch.setattr(ClipReward, "__call__", lambda self, imgs, rs: {"reward": [0.0] * len(imgs),
                                                                        "lambda_harmonic": [0.1] * len(imgs),
                                                                        "raw_sim": [0.3] * len(imgs)})
    out = VerifierReward(GRPOConfig(reward="verifier"))(images, rows)
    assert out["reward"][0] == 1.0 and out["reward"][2] == 1.0
    assert 0.0 <= out["reward"][1] < 1.0
    assert out["lambda_harmonic"] == [0.1] * 3  # the CLIP pieces stay CLIP's
    # DAR's easiness follows the reward being optimised: the all-true drawings are easy, the blank one hard
    assert out["raw_sim"] == out["reward"] and out["clip_raw_sim"] == [0.3] * 3


def test_grpo_with_the_verifier_reward_refuses_a_pool_outside_the_world_before_loading_a_model(tmp_path):
    import polars as pl

    from trainers.grpo.grpo_config import GRPOConfig
    from trainers.grpo.grpo_trainer import train

    world = [world_item(9, "t2i", i, max_objects=1).text for i in range(3)]
    rows = [{"prompt_id": f"w{i}", "task": "t2i", "text": t, "split": "train"} for i, t in enumerate(world)]
    rows += [{"prompt_id": "cat", "task": "t2i", "text": "a cat on a sofa", "split": "train"},
             {"prompt_id": "h-dog", "task": "t2i", "text": "a dog at the beach", "split": "heldout"}]
    pool = tmp_path / "pool.parquet"
    pl.DataFrame(rows).write_parquet(pool)
    # the model path does not exist: a refusal that names the prompts proves the check runs before any load
    cfg = GRPOConfig(pretrained_model=str(tmp_path / "no-model"), prompt_pool=str(pool), reward="verifier",
                     output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"2 of 5 prompts .* not in its grammar: cat \(.*h-dog \(") as refused:
        train(cfg)
    assert not any(f"w{i}" in str(refused.value) for i in range(3))  # the world's prompts pass
    train_world = GRPOConfig(**{**cfg.__dict__, "prompt_pool": str(tmp_path / "world.parquet")})
    pl.DataFrame(rows[:3]).write_parquet(train_world.prompt_pool)
    with pytest.raises(Exception) as loading:  # a world pool passes the check and goes on to load the model
        train(train_world)
    assert "grammar" not in str(loading.value)


def test_verifier_agreement_scores_labels_that_follow_the_verifier_above_ones_that_invert_it():
    import polars as pl

    from labelers.diagnostics import verifier_agreement
    from labelers.rubrics import load_rubric

    dims = load_rubric("t2i").dimension_names
    items = [world_item(11, "t2i", i, max_objects=1) for i in range(6)]
    images, rows = {}, []
    for i, it in enumerate(items):
        for good in (True, False):
            cid = f"{i}-{good}"
            images[cid] = render(it.scene, 48) if good else Image.new("RGB", (48, 48), (25, 25, 25))
            rows.append({"candidate_id": cid, "prompt_id": f"p{i}", "status": "ok",
                         **{d: (5.0 if good else 1.0) for d in dims},
                         "clip_t": 0.9 if good else 0.1, "reward": 0.2 if good else 0.8})  # reward inverted
    labels = pl.DataFrame(rows)
    prompts = {f"p{i}": ("t2i", it.text) for i, it in enumerate(items)}
    out = verifier_agreement(labels, images, prompts)
    assert out["candidates"] == 12 and out["skipped"] == 0
    assert out["pairwise_judge"] == 1.0 and out["pairwise_clip"] == 1.0 and out["pairwise_reward"] == 0.0
    assert out["pairwise_n"] == 6 and out["fully_correct"] == 0.5
    assert out["pair_counts"]["reward"] == {"agree": 0, "ordered": 6, "tied": 0, "told_apart": 6}
    assert 0.0 < out["exact"] <= 1.0 and out["within_1"] >= out["exact"]
    # a prompt outside the world's grammar is skipped, not an error
    prompts["p0"] = ("t2i", "a photo of a cat")
    assert verifier_agreement(labels, images, prompts)["skipped"] == 2


def test_label_agreement_pools_batches_by_counts_and_reads_as_one_line():
    from pipelines.proving import labels_line, pooled_label_agreement

    def batch(candidates, judge, clip, reward):
        def counts(agree, ordered, tied):
            return {"agree": agree, "ordered": ordered, "tied": tied, "told_apart": ordered + tied}
        return {"candidates": candidates, "pair_counts": {"judge": counts(*judge), "clip": counts(*clip),
                                                          "reward": counts(*reward)}}

    pooled = pooled_label_agreement([batch(8, (1, 2, 6), (3, 8, 0), (4, 8, 0)),
                                     batch(24, (9, 10, 20), (10, 30, 0), (27, 30, 0))])
    assert pooled["candidates"] == 32
    assert pooled["judge"]["agreement"] == 10 / 12 and pooled["judge"]["tie_rate"] == 26 / 38
    assert pooled["clip"]["agreement"] == 13 / 38  # pooled by counts, not the mean of the batches' rates
    line = labels_line(pooled)
    assert line.startswith("labels vs the verifier (32 candidates, up to 38 same-prompt pairs")
    assert "judge 83.3 % of 12, ties 68 %" in line and "CLIP-T 34.2 % of 38;" in line
    assert "reward 81.6 % of 38" in line
    assert pooled_label_agreement([{"candidates": 3}]) is None  # written before pair counts existed
    assert "off" in labels_line(None)
