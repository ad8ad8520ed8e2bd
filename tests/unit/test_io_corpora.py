import json
from collections import Counter

import polars as pl
import pytest
from PIL import Image

from pipelines.corpora import corpus_version, latest_version, write_corpus
from pipelines.io import atomic_path, decode_image, encode_image, file_sha256, read_shard, write_shard
from pipelines.paths import safe_key


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_shard_roundtrip_and_checksum(tmp_path):
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    info = write_shard(tmp_path / "000000.tar", [{"__key__": f"k{i}", "png": encode_image(image), "txt": "hi"}
                                                   for i in range(3)])
    assert info["count"] == 3 and info["sha256"] == file_sha256(tmp_path / "000000.tar")
    samples = list(read_shard(tmp_path / "000000.tar"))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"]
    assert decode_image(samples[0]["png"]).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(b"garbage")


def test_safe_key_strips_traversal():
    assert safe_key("../../etc/passwd") == "etc-passwd"
    with pytest.raises(ValueError):
        safe_key("/..//")


def test_corpus_versions_are_content_addressed_and_reused(tmp_path):
    v1 = corpus_version("c", {"p1": "aa"}, {"k": 1})
    assert v1 == corpus_version("c", {"p1": "aa"}, {"k": 1})
    assert v1 != corpus_version("c", {"p1": "ab"}, {"k": 1})
    samples = [({"__key__": f"s{i}", "txt": f"t{i}"}, {"n": i, "task": "t2i"}) for i in range(5)]
    samples.append(({"__key__": "e", "txt": "e", "src.jpg": b"x"}, {"n": 5, "task": "edit"}))
    out, manifest, created = write_corpus(tmp_path, "c", v1, iter(samples), 2, {"inputs": ["p1"]}, Counter(x=1))
    assert created and manifest["num_samples"] == 6 and len(manifest["shards"]) == 4
    assert latest_version(tmp_path) == v1
    index = pl.read_parquet(out / "index.parquet")
    assert index["shard"].to_list() == (["shards/000000.tar"] * 2 + ["shards/000001.tar"] * 2
                                        + ["shards/000002.tar", "shards/000003.tar"])
    # one layout per shard: an edit sample (extra member) never shares a shard with t2i samples
    assert manifest["layouts"] == {"edit:src.jpg,txt": ["shards/000002.tar"],
                                   "t2i:txt": ["shards/000000.tar", "shards/000001.tar", "shards/000003.tar"]}
    for shard in manifest["shards"]:
        assert file_sha256(out / "shards" / shard["shard"]) == shard["sha256"]
    assert json.loads((out / "manifest.json").read_text())["drops"] == {"x": 1}
    _, _, created_again = write_corpus(tmp_path, "c", v1, iter(samples), 2, {"inputs": ["p1"]}, Counter())
    assert not created_again


def test_crash_while_writing_corpus_keeps_previous_version(tmp_path):
    v1 = corpus_version("c", {"p": "1"}, {})
    write_corpus(tmp_path, "c", v1, iter([({"__key__": "a", "txt": "a"}, {})]), 10, {}, Counter())

    def exploding():
        yield {"__key__": "b", "txt": "b"}, {}
        raise OSError("disk full")

    v2 = corpus_version("c", {"p": "2"}, {})
    with pytest.raises(OSError):
        write_corpus(tmp_path, "c", v2, exploding(), 10, {}, Counter())
    assert latest_version(tmp_path) == v1
    assert not (tmp_path / v2).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
