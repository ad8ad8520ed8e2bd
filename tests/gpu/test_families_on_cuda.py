"""Every model family on CUDA under bf16 (skipped without CUDA): generation, and GRPO's first-update ratio 1."""

import pytest

pytestmark = pytest.mark.gpu

FLOW = ["sd3", "flux", "qwen_image_edit"]


@pytest.mark.parametrize("name", ["t2i", "sdxl", *FLOW])
def test_family_samples_and_recomputes_log_probs_on_cuda_in_bf16(name):
    import torch

    from pipelines.zoo import resolve_model
    from trainers.families import load_family
    from trainers.grpo.grpo_trainer import transition_log_prob

    family = load_family(resolve_model(f"zoo:{name}"), device="cuda")
    cond = family.encode(["a red square", "a dog"], None, 64)
    uncond = family.encode(["", ""], None, 64)
    sde_type = family.sde_types[0]
    gen = torch.Generator().manual_seed(0)
    noise = family.initial_noise(gen, 64, batch=2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = family.sample(cond, uncond, noise, 4, 64, guidance=3.0, eta=0.7, sde_type=sde_type, generator=gen)
        j = next(i for i, s in enumerate(out["stds"]) if s > 1e-8)
        logp, *_ = transition_log_prob(family, out["schedule"], j, out["latents"][j], out["latents"][j + 1], cond,
                                       uncond, 3.0, 0.7, sde_type)
    ratio = torch.exp(logp.float() - out["log_probs"][j].float())
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    pixels = family.latents_to_images(out["latents"][-1], 64)
    assert pixels.shape == (2, 3, 64, 64) and torch.isfinite(pixels).all()
