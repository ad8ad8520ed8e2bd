"""Subject-driven RPO (``trainers.rpo``): the loss pieces, the Bradley-Terry pairs, and a tiny CPU run on a
deliberately learnable subject (a large purple triangle drawn by :mod:`pipelines.subject`).

The run (zoo:t2i at 64 px, the world-trained CLIP ``zoo:world_clip`` as reward, one thread, fixed seeds, ~50 s):
validation λ-Harmonic picks the kept checkpoint (the selected step is the argmax of the logged curve), CLIP-I of
held-out samples to the references rises from the base to the selected checkpoint while CLIP-T stays within
``CLIP_T_TOLERANCE``. ``pytest -s`` prints the curve."""

from __future__ import annotations

import math

import pytest

import trainers  # noqa: F401  (torchvision shim before diffusers)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIP_T_TOLERANCE = 0.02  # |CLIP-T(selected) - CLIP-T(base)| on the held-out prompts


# ------------------------------------------------------------------------------------------------ loss pieces
def test_reconstruction_loss_zero_iff_prediction_equals_target():
    from trainers.rpo.rpo_trainer import reconstruction_loss

    target = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert reconstruction_loss(target.clone(), target).item() == 0.0
    off = target + 0.5
    assert reconstruction_loss(off, target).item() == pytest.approx(0.25, rel=1e-6)
    pred = torch.zeros_like(target, requires_grad=True)
    reconstruction_loss(pred, target).backward()
    assert torch.allclose(pred.grad, -2 * target / target.numel())


def _errs(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) for _ in range(4)]


def test_preference_loss_is_diffusion_dpo_and_flips_with_swapped_pairs():
    from trainers.losses import diffusion_dpo_loss
    from trainers.rpo.rpo_trainer import preference_loss

    mw, ml, rw, rl = _errs()
    beta = 50.0
    loss, acc, margin = preference_loss(mw, ml, rw, rl, beta)
    ref = diffusion_dpo_loss(mw, ml, rw, rl, beta)
    assert loss.item() == ref[0].item() and acc.item() == ref[1].item() and margin.item() == ref[2].item()
    hard = preference_loss(mw, ml, rw, rl, beta, p_chosen=torch.ones(len(mw)))
    assert hard[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # swapping preferred and rejected negates the DPO logit (margin) and turns the accuracy around
    swapped = preference_loss(ml, mw, rl, rw, beta)
    assert swapped[2].item() == pytest.approx(-margin.item(), abs=1e-6)
    assert swapped[1].item() == pytest.approx(1.0 - acc.item())
    # the model that denoises the preferred image better than the reference has a lower loss than its mirror image
    good = preference_loss(torch.tensor([0.1]), torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.3]), beta)
    bad = preference_loss(torch.tensor([0.5]), torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.3]), beta)
    assert good[2].item() > 0 > bad[2].item() and good[0].item() < math.log(2) < bad[0].item()
    # at the reference: log 2 for any label
    same = preference_loss(rw, rl, rw, rl, beta, p_chosen=torch.full((len(rw),), 0.7))
    assert same[0].item() == pytest.approx(math.log(2), rel=1e-6)


def test_soft_label_loss_is_minimal_at_the_bradley_terry_logit():
    from trainers.rpo.rpo_trainer import preference_loss

    p, beta = 0.8, 2.0
    target = math.log(p / (1 - p))  # inside = -½β·(m_w - m_l) with equal reference errors
    xs = torch.linspace(-3, 3, 601)
    losses = [preference_loss(torch.tensor([-2 * x / beta]), torch.tensor([0.0]), torch.tensor([0.0]),
                              torch.tensor([0.0]), beta, p_chosen=[p])[0].item() for x in xs.tolist()]
    best = xs[int(torch.tensor(losses).argmin())].item()
    assert best == pytest.approx(target, abs=0.02)


def test_combined_loss():
    from trainers.rpo.rpo_trainer import combined_loss

    pref, recon = torch.tensor(0.7), torch.tensor(0.2)
    assert combined_loss(pref, recon, 0.5).item() == pytest.approx(0.8)
    assert combined_loss(None, recon, 2.0).item() == pytest.approx(0.4)
    assert combined_loss(pref, None, 2.0).item() == pytest.approx(0.7)
    with pytest.raises(ValueError):
        combined_loss(None, None, 1.0)


def test_bt_pairs_and_prompts():
    from labelers.bradley_terry import bt_probability
    from trainers.rpo import RPOConfig
    from trainers.rpo.rpo_trainer import bt_pairs, subject_prompt

    pairs = bt_pairs([0.30, 0.10, 0.31, float("nan")], tau=0.05, min_p=0.6)
    assert [(c, r) for c, r, _ in pairs] == [(2, 1), (0, 1)]  # the near-tie (0, 2) and the NaN are dropped
    assert pairs[0][2] == pytest.approx(bt_probability(0.31, 0.10, 0.05))
    assert len(bt_pairs([0.1, 0.2, 0.3, 0.4], tau=1.0, max_pairs=2)) == 2
    cfg = RPOConfig(class_noun="dog", identifier="sks")
    assert subject_prompt("a {subject} on the beach", cfg) == "a sks dog on the beach"
    assert subject_prompt("a {subject} on the beach", cfg, with_identifier=False) == "a dog on the beach"
    with pytest.raises(ValueError):
        subject_prompt("no placeholder", cfg)


def test_subject_pictures(tmp_path):
    import numpy as np
    from PIL import Image

    from labelers.verifier import OBJECT_COLOURS
    from pipelines.subject import write_subject

    paths = write_subject(tmp_path, n=4, size=64)
    assert [p.name for p in paths] == [f"ref_{k}.png" for k in range(4)]
    purple = np.array(OBJECT_COLOURS["purple"])
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    for a in arrays:  # the same large purple triangle in every picture (~ half of its bounding square)
        assert 120 <= (a == purple).all(-1).sum() <= 170  # side 0.27 x 64 = 17 px
    assert len({a.tobytes() for a in arrays}) == 4  # at different places, on different backgrounds


# ------------------------------------------------------------------------------------------------ a subject run
@pytest.mark.slow
def test_subject_run_selects_by_lambda_harmonic_and_raises_clip_i(tmp_path):
    import json

    from pipelines.subject import write_subject
    from trainers.rpo import RPOConfig, train

    subject = tmp_path / "subject"
    write_subject(subject, n=4, size=64)
    cfg = RPOConfig(
        pretrained_model="zoo:t2i", resolution=64, subject_dir=str(subject), class_noun="triangle",
        clip_model="zoo:world_clip", output_dir=str(tmp_path / "run"), device="cpu", num_threads=1, seed=0,
        prompt_templates=["a {subject} on a white background", "a {subject} on a grey background",
                          "a {subject} on a black background", "a photo of a {subject}"],
        validation_prompts=["a {subject} in the middle on a white background", "a picture of a {subject}"],
        heldout_prompts=["an image of a {subject}", "a {subject} on a dark background"],
        rounds=5, steps_per_round=8, candidates_per_prompt=4, patience=2, lora_rank=8, learning_rate=1e-2,
        beta=500.0, recon_weight=1.0, lam=0.5,
    )
    result = train(cfg)
    curve = result["curve"]
    for c in curve:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in c.items() if k.startswith(("val", "r", "s"))})
    print("heldout", json.dumps(result["heldout"]))

    # model selection: the kept step is the argmax of the logged validation λ-Harmonic curve
    best = max(curve, key=lambda c: c["val_lambda_harmonic"])
    assert result["best_step"] == best["step"] and result["best_val_lambda_harmonic"] == best["val_lambda_harmonic"]
    assert result["best_step"] > 0, "training never beat the base on validation"
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_lambda_harmonic"] for r in logged if "val_lambda_harmonic" in r] == \
        [c["val_lambda_harmonic"] for c in curve[1:]]
    # early stopping: patience rounds without improvement after the best one end the run
    if result["stopped_early"]:
        assert curve[-1]["round"] == best["round"] + cfg.patience
    # the selected adapter is adapter/ (the same weights as best_adapter/)
    from safetensors.torch import load_file

    sel = load_file(str(tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors"))
    kept = load_file(str(tmp_path / "run" / "best_adapter" / "pytorch_lora_weights.safetensors"))
    assert sel.keys() == kept.keys() and all(torch.equal(sel[k], kept[k]) for k in sel)

    # CLIP-I to the references rises over training (validation and held-out), CLIP-T stays within tolerance
    assert best["val_clip_i"] > curve[0]["val_clip_i"]
    base, chosen = result["heldout"]["base"], result["heldout"]["selected"]
    assert chosen["clip_i"] > base["clip_i"] + 0.002
    assert abs(chosen["clip_t"] - base["clip_t"]) <= CLIP_T_TOLERANCE
    assert chosen["lambda_harmonic"] > base["lambda_harmonic"]
