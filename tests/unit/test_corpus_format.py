"""The corpus format module refuses what the writer never commits."""

import json

import pytest

from pipelines import corpus_format as cf


def test_a_directory_without_manifest_is_not_a_version(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / cf.shard_name(0)).write_bytes(b"")
    with pytest.raises(FileNotFoundError):
        cf.read_manifest(tmp_path)


@pytest.mark.parametrize("manifest", [[], {"shards": {"a": 1}}, {"shards": ["000000.tar"]}, "x"])
def test_a_malformed_manifest_names_the_file(tmp_path, manifest):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json"):
        cf.read_manifest(tmp_path)


def test_shard_entries_round_trip_through_rebase(tmp_path):
    entry = cf.shard_entry(3, "t2i", "p0", 5)
    assert cf.shard_path(entry).endswith(cf.shard_name(3))
    rebased = cf.rebase(cf.shard_path(entry), "v1")
    assert rebased.startswith("../v1/")
    assert cf.parse_latest(cf.latest_bytes("v2"), "latest") == "v2"
