"""The proving ground's shipped trained components (pipelines/zoo/trained.py): laid over the base zoo build with
their hashes checked, and rebuilt when the shipped files change."""

import json

import pytest

from pipelines import zoo
from pipelines.zoo import trained


@pytest.fixture()
def shipped(tmp_path, monkeypatch):
    """A fake shipped component 'world_judge' over a fake base builder (no model build in this test)."""
    ship = tmp_path / "shipped"
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"trained weights")
    (run / "config.json").write_text('{"trained": true}')
    (run / "processor_config.json").write_text('{"trained": true}')
    (run / "train_info.json").write_text(json.dumps({"eval": {"exact": 0.5}}))
    monkeypatch.setattr(trained, "SHIPPED", ship)

    def fake_base(out_dir):
        (out_dir / "model.safetensors").write_bytes(b"random weights")
        (out_dir / "config.json").write_text("{}")
        (out_dir / "tokenizer.json").write_text("{}")

    original = zoo._builder
    monkeypatch.setattr(zoo, "_builder", lambda name: fake_base if name == "judge" else original(name))
    trained.ship_world_judge(run, "python -m pipelines.proving_judge --out DIR")
    return ship


def test_overlay_replaces_the_base_files_and_records_the_manifest(shipped, tmp_path):
    out = tmp_path / "built"
    out.mkdir()
    info = trained.build_world_judge(out)
    assert (out / "model.safetensors").read_bytes() == b"trained weights"
    assert (out / "config.json").read_text() == '{"trained": true}'
    assert (out / "tokenizer.json").exists()  # the base build's other files stay
    assert info["trained_by"] == "python -m pipelines.proving_judge --out DIR"
    assert info["eval"] == {"exact": 0.5} and info["manifest_sha256"] == trained.manifest_sha256("world_judge")


def test_a_shipped_file_that_does_not_match_its_hash_is_refused(shipped, tmp_path):
    (shipped / "world_judge" / "model.safetensors").write_bytes(b"tampered")
    out = tmp_path / "built"
    out.mkdir()
    with pytest.raises(RuntimeError, match="does not match MANIFEST.json"):
        trained.build_world_judge(out)


def test_a_component_built_from_older_shipped_files_is_out_of_date(shipped, tmp_path):
    root = tmp_path / "zoo"
    built = zoo.build_zoo(root=root, only="world_judge")["world_judge"]
    assert zoo.is_complete(built)
    manifest = shipped / "world_judge" / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace("--out DIR", "--out DIR --steps 9"))  # a re-ship
    assert not zoo.is_complete(built)
    zoo.build_zoo(root=root, only="world_judge")
    assert zoo.is_complete(built)


@pytest.mark.parametrize("train_text", [True, False])
def test_ship_world_gen_ships_the_text_encoders_of_runs_that_trained_them(tmp_path, monkeypatch, train_text):
    ship = tmp_path / "shipped"
    monkeypatch.setattr(trained, "SHIPPED", ship)
    (ship / "world_gen" / "stale").mkdir(parents=True)
    (ship / "world_gen" / "stale" / "old.bin").write_bytes(b"from an older ship")
    run = tmp_path / "run"
    for rel in trained.WORLD_GEN_FILES + trained.WORLD_GEN_TEXT_FILES:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(rel.encode())
    (run / zoo.MARKER).write_text(json.dumps({"train_text": train_text, "steps": 7, "eval": {"correct": 0.1}}))
    trained.ship_world_gen(run, "python -m pipelines.proving_train generator ...")
    manifest = json.loads((ship / "world_gen" / "MANIFEST.json").read_text())
    text = set(trained.WORLD_GEN_TEXT_FILES)
    assert (text <= set(manifest["files"])) is train_text and (not text & set(manifest["files"])) is not train_text
    assert manifest["train_text"] is train_text and manifest["steps"] == 7
    assert not (ship / "world_gen" / "stale").exists()


def test_world_clip_is_laid_over_zoo_clip(tmp_path, monkeypatch):
    ship = tmp_path / "shipped"
    monkeypatch.setattr(trained, "SHIPPED", ship)
    run = tmp_path / "built_world_clip"
    run.mkdir()
    (run / "open_clip_model.safetensors").write_bytes(b"world clip weights")
    (run / zoo.MARKER).write_text(json.dumps({"build": {"eval": {"retrieval": 0.9}}}))  # a built zoo:world_clip
    trained.ship_world_clip(run, "python -m pipelines.proving_train clip --out DIR")

    def fake_clip(out_dir):
        (out_dir / "open_clip_model.safetensors").write_bytes(b"random clip weights")
        (out_dir / "open_clip_config.json").write_text("{}")

    original = zoo._builder
    monkeypatch.setattr(zoo, "_builder", lambda name: fake_clip if name == "clip" else original(name))
    out = tmp_path / "out"
    out.mkdir()
    info = trained.build_world_clip(out)
    assert (out / "open_clip_model.safetensors").read_bytes() == b"world clip weights"
    assert (out / "open_clip_config.json").exists() and info["eval"] == {"retrieval": 0.9}


def test_an_edit_generator_run_ships_as_world_edit_only(tmp_path, monkeypatch):
    monkeypatch.setattr(trained, "SHIPPED", tmp_path / "shipped")
    run = tmp_path / "run"
    for rel in trained.WORLD_GEN_FILES + trained.WORLD_GEN_TEXT_FILES:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(rel)
    (run / zoo.MARKER).write_text(json.dumps({"task": "edit", "train_text": True, "eval": {"cfg3": {"correct": 0.3}}}))
    with pytest.raises(ValueError, match="edit generator run, not t2i"):
        trained.ship_world_gen(run, "python -m pipelines.proving_train generator --task edit")
    assert not (tmp_path / "shipped" / "world_gen").exists()
    target = trained.ship_world_edit(run, "python -m pipelines.proving_train generator --task edit")
    manifest = json.loads((target / "MANIFEST.json").read_text())
    assert manifest["task"] == "edit" and manifest["eval"] == {"cfg3": {"correct": 0.3}}
    assert set(manifest["files"]) == set(trained.WORLD_GEN_FILES + trained.WORLD_GEN_TEXT_FILES)
    (run / zoo.MARKER).write_text(json.dumps({"train_text": True}))  # a t2i run (no task: from before edits)
    with pytest.raises(ValueError, match="t2i generator run, not edit"):
        trained.ship_world_edit(run, "x")
