"""A reduced proving ground in CI time: world prompts -> candidates of the trained world generator -> labels ->
preference_pairs -> preference_corpus -> dpo_run, through Dagster, then checked against the verifier's own reading
of the images (independent of every label on the way). It fails when labels are flipped anywhere between
preference_pairs and the trainer:

* in the pairs or the corpus: the corpus' preferred image must be the one the verifier finds more facts true in;
* in the trainer (its reading of the labels, its loss): the trained adapter must make the verifier-preferred
  image of each pair relatively more likely (Diffusion-DPO's implicit preference, positive), and a DPO run on the
  same corpus with every label flipped (``label_flip: 1``) must come out negative — so the check can fail.

The judge here is the verifier (asked for explicitly, so the labels carry a known signal); ``make prove`` labels
with the VLM judge and the world CLIP instead."""

import json

import dagster as dg
import numpy as np
import pytest

from pipelines.definitions import ALL_ASSETS
from pipelines.partitions import PROMPT_BATCH_PARTITIONS
from pipelines.proving_world import write_batch
from pipelines.resources import default_resources

pytestmark = pytest.mark.slow

PARTITIONED = {"prompt_batches", "candidate_images", "reward_labels", "preference_pairs"}
PROFILE = """
extends: proving
name: proving_reduced
generation:
  seeds_per_prompt: 4
  base_seed: 0
  batch_size: 16
  shard_size: 256
  generators:
    t2i:       {model: "zoo:world_gen", kind: t2i, steps: 8, guidance_scale: 3.0, width: 48, height: 48}
    edit:      {model: "zoo:qwen_image_edit", kind: edit, steps: 6, guidance_scale: 3.0, width: 64, height: 64}
    multi_ref: {model: "zoo:qwen_image_edit", kind: edit, steps: 6, guidance_scale: 3.0, width: 64, height: 64}
judge: {backend: verifier}
clip: {backend: open_clip, model: "zoo:clip", batch_size: 64}
rewards:
  lambda: {t2i: 0.0, edit: 0.5, multi_ref: 0.7}
  drs: {enabled: false}
  judge_weight: 1.0
  clip_weight: 0.0
  diversity: {enabled: false}
training:
  model: "zoo:world_gen"
  tasks: [t2i]
  sft:  {max_steps: 4, batch_size: 4, lora_rank: 4, learning_rate: 1.0e-3, resolution: 48}
  dpo:  {max_steps: 30, batch_size: 8, lora_rank: 8, learning_rate: 2.0e-3, beta: 500.0, checkpoint_every: 30,
         resolution: 48, sample_latents: false}
  grpo: {num_steps: 1, group_size: 2, prompts_per_step: 1, sample_steps: 4, resolution: 48, heldout_prompts: 0}
"""


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prove")
    data = tmp / "data"
    write_batch(data / "inbox", seed=3, n_per_task={"t2i": 64}, size=48, heldout_fraction=0.0, name="prove",
                max_objects=1)
    profile = tmp / "proving_reduced.yaml"
    profile.write_text(PROFILE)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, ["prove"])
    resources = default_resources(str(data), str(profile))
    first = dg.materialize([a for a in ALL_ASSETS if a.key.to_user_string() in PARTITIONED], partition_key="prove",
                           instance=instance, resources=resources)
    second = dg.materialize([a for a in ALL_ASSETS if a.key.to_user_string() in {"preference_corpus", "dpo_run"}],
                            instance=instance, resources=resources)
    assert first.success and second.success
    return data


def _verified_pairs(data):
    """The corpus' pairs as (corpus-preferred, corpus-dispreferred, prompt, verifier agrees) where the verifier
    finds a different share of facts true in the two images."""
    from labelers.judge import JudgeItem
    from labelers.verifier import verify
    from pipelines.corpora import latest_version, version_url
    from trainers.data import preference_samples

    root = data / "corpora" / "preference_corpus"
    version = version_url(root, latest_version(root))

    def share(image, text):
        return verify(JudgeItem(key="", task="t2i", text=text, image=image)).fact_share

    out = []
    for img_0, img_1, caption, label_0, label_1, *_ in preference_samples(version, drop_ties=True):
        w, l = (img_0, img_1) if label_0 > label_1 else (img_1, img_0)
        s_w, s_l = share(w, caption), share(l, caption)
        if s_w != s_l:
            out.append((w, l, caption, s_w > s_l))
    return version, out


def test_corpus_labels_agree_with_the_verifier(reduced):
    _, pairs = _verified_pairs(reduced)
    assert len(pairs) >= 12, f"only {len(pairs)} pairs the verifier can tell apart"
    agree = np.mean([p[3] for p in pairs])
    print(f"\ncorpus label agreement with the verifier: {agree:.3f} over {len(pairs)} pairs")
    # the reward is the mean of the judge's dimension scores (visual quality included), not the share of true facts,
    # so some pairs disagree (0.765 over 34 pairs with the shipped generator); flipped labels put this near
    # 1 - agreement (~0.24), far below the bar
    assert agree >= 0.65


def test_dpo_learns_the_verifiers_preference_and_flipped_labels_unlearn_it(reduced, tmp_path):
    from pipelines.paths import Layout
    from pipelines.proving import implicit_preference
    from pipelines.runs import latest_run
    from pipelines.zoo import resolve_model
    from trainers.dpo.dpo_trainer import train

    version, pairs = _verified_pairs(reduced)
    truth = [(w, l, c) if agree else (l, w, c) for w, l, c, agree in pairs]  # verifier-preferred first
    model = resolve_model("zoo:world_gen")
    run = latest_run(Layout(reduced), "dpo")
    adapter = json.loads((run / "result.json").read_text())["adapter_path"]
    as_labelled = np.array(implicit_preference(model, adapter, truth, size=48))
    config = json.loads((run / "config.json").read_text())
    flipped_dir = tmp_path / "dpo_flipped"
    flipped = train({**config, "output_dir": str(flipped_dir), "label_flip": 1.0, "corpus_dir": str(version)})
    as_flipped = np.array(implicit_preference(model, flipped["adapter_path"], truth, size=48))
    print(f"\nimplicit preference for the verifier's choice: as labelled mean {as_labelled.mean():+.4f} "
          f"(positive {np.mean(as_labelled > 0):.2f}), flipped mean {as_flipped.mean():+.4f} "
          f"(positive {np.mean(as_flipped > 0):.2f}) over {len(truth)} pairs")
    assert as_labelled.mean() > 0 and np.mean(as_labelled > 0) >= 0.6
    assert as_flipped.mean() < 0 and np.mean(as_flipped > 0) <= 0.4
