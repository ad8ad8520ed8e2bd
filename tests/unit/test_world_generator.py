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
