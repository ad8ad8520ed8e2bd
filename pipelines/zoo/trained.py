"""The proving ground's trained zoo components (built on first use of ``zoo:<name>``, not by ``make zoo``).

* ``world_gen``: the zoo's tiny FLUX pipeline (``build_flux``, byte-identical on every machine) with the transformer,
  VAE, T5 window (and, for runs with ``train_text``, both text encoders) trained on the procedural world by
  ``python -m pipelines.proving_train generator``. Its four stages take ~66 minutes on 2 cores, so the output files
  are shipped in ``pipelines/zoo/trained/world_gen/`` (13 MB, with ``MANIFEST.json``: each file's sha256, the exact
  commands, and the trained model's measured skill) and laid over the base build here; a file whose hash differs
  from the manifest is refused.
* ``world_edit``: the zoo's tiny FLUX.1 Kontext pipeline (``build_flux_kontext``) with the same file set as
  ``world_gen``'s, from ``python -m pipelines.proving_train generator --task edit --init-from <a world_gen run>``:
  the world's edits (source scene as the input image), shipped in ``pipelines/zoo/trained/world_edit/``.
* ``world_clip``: the tiny CLIP trained contrastively on the world (``python -m pipelines.proving_train clip
  --threads 1``, ~3 minutes; seeded, its weights depend on the thread count), shipped the same way (its weights laid
  over ``zoo:clip``, whose config it shares).

* ``world_judge``: a Qwen2.5-VL judge of zoo:judge's tokenizer and chat template, with its own config (a lower RoPE
  base, 4 language-model layers, a wider vision tower) and pixel budget, trained to read world scenes and then on
  the verifier's answers (two ``python -m pipelines.proving_judge`` commands, ~45 minutes; the exact line is in its
  MANIFEST.json), shipped the same way (``model.safetensors``, ``config.json``
  and ``processor_config.json`` laid over ``zoo:judge``).

Refresh a shipped component with ``python -m pipelines.zoo.trained
ship-world-gen|ship-world-edit|ship-world-clip|ship-world-judge RUN_DIR COMMAND...`` on a training run's output
directory.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).resolve().parent / "trained"
MANIFEST = "MANIFEST.json"
# what a world_gen run changes in the base flux build (everything else is build_flux's, byte for byte)
WORLD_GEN_FILES = (
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "tokenizer_2/tokenizer_config.json",
)
# ... and, when the run trained them jointly (train_text), both text encoders
WORLD_GEN_TEXT_FILES = (
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
)


def _sha256(path: Path) -> str:
    from pipelines.io import file_sha256

    return file_sha256(path)


def _overlay(name: str, out_dir: Path, base: str) -> dict[str, Any]:
    """Build the zoo component ``base`` into ``out_dir`` and lay the shipped trained files of ``name`` over it."""
    from pipelines.zoo import MARKER, _builder

    manifest = json.loads((SHIPPED / name / MANIFEST).read_text())
    _builder(base)(out_dir)
    (out_dir / MARKER).unlink(missing_ok=True)
    for rel, digest in manifest["files"].items():
        src = SHIPPED / name / rel
        if _sha256(src) != digest:
            raise RuntimeError(f"shipped {name} file {src} does not match {MANIFEST} (sha256 {digest[:16]})")
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return {"trained_by": manifest["command"], "eval": manifest.get("eval"), "manifest_sha256": manifest_sha256(name)}


def manifest_sha256(name: str) -> str | None:
    """The shipped manifest's hash: a built component whose marker holds another one is out of date."""
    path = SHIPPED / name / MANIFEST
    return _sha256(path) if path.exists() else None


def build_world_gen(out_dir: Path) -> dict[str, Any]:
    """The base tiny FLUX build with the shipped trained files laid over it (hashes checked)."""
    return _overlay("world_gen", out_dir, "flux")


def build_world_edit(out_dir: Path) -> dict[str, Any]:
    """The base tiny FLUX.1 Kontext build (``build_flux_kontext``) with the shipped world edit generator's files
    laid over it (hashes checked): the same file set as ``world_gen``'s."""
    return _overlay("world_edit", out_dir, "flux_kontext")


def build_world_judge(out_dir: Path) -> dict[str, Any]:
    """The zoo judge with the shipped fine-tuned weights (``python -m pipelines.proving_judge``) laid over it."""
    return _overlay("world_judge", out_dir, "judge")


def build_world_clip(out_dir: Path) -> dict[str, Any]:
    """The zoo CLIP build with the shipped world-CLIP weights laid over it (hashes checked; the config is zoo:clip's)."""
    return _overlay("world_clip", out_dir, "clip")


def ship(name: str, run_dir: Path, files: tuple[str, ...], command: str, info: dict[str, Any]) -> Path:
    """Copy a training run's ``files`` into ``pipelines/zoo/trained/<name>`` with a manifest of their hashes, the
    command that made them and what it measured (``info``); no file of an older ship is left behind."""
    target = SHIPPED / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    hashes = {}
    for rel in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(run_dir) / rel, target / rel)
        hashes[rel] = _sha256(target / rel)
    (target / MANIFEST).write_text(json.dumps({"command": command, "files": hashes, **info}, indent=2) + "\n")
    return target


def ship_world_gen(run_dir: Path, command: str, name: str = "world_gen", task: str = "t2i") -> Path:
    """Ship a ``proving_train generator`` run of ``task`` as ``name`` (``world_edit``: an edit run)."""
    from pipelines.zoo import MARKER

    marker = json.loads((Path(run_dir) / MARKER).read_text())
    run_task = marker.get("task", "t2i")  # runs from before edit training have no task: t2i
    if run_task != task:
        raise ValueError(f"{run_dir} is a {run_task} generator run, not {task}: not shipped as {name}")
    keep = ("seed", "steps", "batch", "image_size", "lr", "transformer", "cond_dropout", "max_objects",
            "text_tokens", "plain", "train_text", "object_loss_weight", "ema_decay", "lr_decay", "colour_confusion",
            "background_confusion", "vae", "train_seconds", "build_seconds", "eval", "eval_curve")
    files = WORLD_GEN_FILES + (WORLD_GEN_TEXT_FILES if marker.get("train_text") else ())
    return ship(name, run_dir, files, command, {"task": task, **{k: marker.get(k) for k in keep}})


def ship_world_edit(run_dir: Path, command: str) -> Path:
    return ship_world_gen(run_dir, command, name="world_edit", task="edit")


def ship_world_clip(run_dir: Path, command: str) -> Path:
    """Ship a world-CLIP directory: its weights (the config is zoo:clip's, byte for byte) and what it measured —
    from a ``proving_train clip`` run's marker or a built ``zoo:world_clip``'s."""
    from pipelines.zoo import MARKER

    marker = json.loads((Path(run_dir) / MARKER).read_text())
    info = {"eval": marker.get("eval") or (marker.get("build") or {}).get("eval")}
    return ship("world_clip", run_dir, ("open_clip_model.safetensors",), command, info)


WORLD_JUDGE_FILES = ("model.safetensors", "config.json", "processor_config.json")


def ship_world_judge(run_dir: Path, command: str) -> Path:
    info = json.loads((Path(run_dir) / "train_info.json").read_text())
    return ship("world_judge", run_dir, WORLD_JUDGE_FILES, command, info)


if __name__ == "__main__":
    shippers = {"ship-world-gen": ship_world_gen, "ship-world-edit": ship_world_edit,
                "ship-world-clip": ship_world_clip, "ship-world-judge": ship_world_judge}
    if len(sys.argv) >= 4 and sys.argv[1] in shippers:
        print(shippers[sys.argv[1]](Path(sys.argv[2]), " ".join(sys.argv[3:])))
    else:
        sys.exit("usage: python -m pipelines.zoo.trained ship-world-gen|ship-world-edit|ship-world-clip|"
                 "ship-world-judge RUN_DIR COMMAND...")
