"""The corpus writer: versions, layouts, byte limits, refresh by reference, crash and resume, fsspec stores."""

import json
import os
from collections import Counter

import polars as pl
import pytest

from pipelines.corpora import (
    CorpusStore,
    ShardLimits,
    build_corpus,
    corpus_version,
    latest_version,
    read_manifest,
    verify_corpus,
)
from pipelines.io import read_shard


class DictSource:
    """partition -> [(sample, row)]; ``fail_on`` raises halfway through that partition (a crash)."""

    def __init__(self, data, fail_on=None):
        self.data = data
        self.fail_on = fail_on
        self.reused_calls = []
        self.asked = []

    def samples(self, partition, drops: Counter):
        self.asked.append(partition)
        drops["dropped_for_test"] += 1
        for i, item in enumerate(self.data[partition]):
            if partition == self.fail_on and i == len(self.data[partition]) // 2:
                raise OSError(f"disk full while writing {partition}")
            yield item

    def reused(self, partition, rows):
        self.reused_calls.append((partition, len(rows)))


def samples_for(partition, n, task="t2i", payload=100):
    return [({"__key__": f"{partition}-{i}", "txt": f"caption {i}", "bin": os.urandom(payload)},
             {"task": task, "n": i}) for i in range(n)]


def keys_in(version_dir):
    manifest = read_manifest(version_dir)
    keys = []
    for shard in manifest["shards"]:
        path = os.path.normpath(os.path.join(str(version_dir), shard["path"]))
        keys += [s["__key__"] for s in read_shard(path)]
    return keys


def test_version_layout_index_and_reuse(tmp_path):
    data = {"p1": samples_for("p1", 5) + samples_for("p1e", 1, task="edit"), "p2": samples_for("p2", 3)}
    inputs = {"p1": "fp1", "p2": "fp2"}
    build = build_corpus(tmp_path, "c", inputs, {"k": 1}, DictSource(data), ShardLimits(max_samples=2))
    assert build.created and build.written == ["p1", "p2"] and build.version == corpus_version("c", inputs, {"k": 1})
    assert latest_version(tmp_path) == build.version
    manifest = build.manifest
    assert manifest["num_samples"] == 9 and manifest["drops"] == {"dropped_for_test": 2}
    # shards are cut per partition and per layout: p1 t2i 2+2, then the open chunks in layout order (edit 1, t2i 1), p2 2+1
    assert [(s["partition"], s["count"]) for s in manifest["shards"]] == [
        ("p1", 2), ("p1", 2), ("p1", 1), ("p1", 1), ("p2", 2), ("p2", 1)]
    assert [s["path"] for s in manifest["shards"]] == [f"shards/{i:06d}.tar" for i in range(6)]
    edit_layout = [k for k in manifest["layouts"] if k.startswith("edit:")]
    assert edit_layout == ["edit:bin,txt"] and manifest["layouts"]["edit:bin,txt"] == ["shards/000002.tar"]
    index = pl.read_parquet(tmp_path / build.version / "index.parquet")
    assert sorted(index["key"].to_list()) == sorted(keys_in(tmp_path / build.version))
    assert set(index.columns) >= {"shard", "key", "partition", "n", "task"}
    assert verify_corpus(tmp_path / build.version) == []
    again = build_corpus(tmp_path, "c", inputs, {"k": 1}, DictSource(data), ShardLimits(max_samples=2))
    assert not again.created and again.version == build.version


def test_shards_cut_by_bytes(tmp_path):
    data = {"p": samples_for("p", 10, payload=3000) + [({"__key__": "big", "txt": "x", "bin": os.urandom(20000)},
                                                        {"task": "t2i"})]}
    # a 3000-byte sample takes 4608 tar bytes (header + padded data per member): two fit in 10240, three do not
    build = build_corpus(tmp_path, "c", {"p": "1"}, {}, DictSource(data), ShardLimits(max_samples=100,
                                                                                       max_bytes=10240))
    counts = [s["count"] for s in build.manifest["shards"]]
    assert counts == [2, 2, 2, 2, 2, 1]  # the oversized sample gets a shard of its own
    assert verify_corpus(tmp_path / build.version) == []
    with pytest.raises(ValueError):
        ShardLimits(max_samples=0)


def test_refresh_writes_only_new_partitions_and_references_the_rest(tmp_path):
    data = {p: samples_for(p, 3) for p in ("a", "b", "c", "d")}
    first = build_corpus(tmp_path, "c", {"a": "1", "b": "1"}, {}, DictSource(data), ShardLimits(max_samples=2))
    source = DictSource(data)
    second = build_corpus(tmp_path, "c", {"a": "1", "b": "1", "c": "1"}, {}, source, ShardLimits(max_samples=2))
    assert second.written == ["c"] and second.reused == ["a", "b"] and source.asked == ["c"]
    assert source.reused_calls == [("a", 3), ("b", 3)]
    paths = [s["path"] for s in second.manifest["shards"]]
    assert paths[:4] == [f"../{first.version}/shards/{i:06d}.tar" for i in range(4)]
    assert paths[4:] == ["shards/000000.tar", "shards/000001.tar"]
    assert not (tmp_path / second.version / "shards" / "000002.tar").exists()
    assert verify_corpus(tmp_path / second.version) == []
    assert sorted(keys_in(tmp_path / second.version)) == sorted(k for p in "abc" for k in [f"{p}-{i}" for i in range(3)])
    index = pl.read_parquet(tmp_path / second.version / "index.parquet")
    assert index.filter(pl.col("partition") == "a")["shard"].unique().to_list()[0].startswith(f"../{first.version}/")
    # a third version references through the second: paths still resolve to the first version's files
    third = build_corpus(tmp_path, "c", {"a": "1", "b": "1", "c": "1", "d": "1"}, {}, DictSource(data),
                         ShardLimits(max_samples=2))
    assert third.written == ["d"]
    assert [s["path"] for s in third.manifest["shards"]][:4] == paths[:4]
    assert [s["path"] for s in third.manifest["shards"]][4:6] == [f"../{second.version}/shards/00000{i}.tar"
                                                                 for i in range(2)]
    assert verify_corpus(tmp_path / third.version) == []
    # a changed partition early in the order, or another config, rewrites from there on
    changed = build_corpus(tmp_path, "c", {"a": "2", "b": "1", "c": "1", "d": "1"}, {}, DictSource(data),
                           ShardLimits(max_samples=2))
    assert changed.written == ["a", "b", "c", "d"]
    other_config = build_corpus(tmp_path, "c", {"a": "2", "b": "1", "c": "1", "d": "1", "e": "1"}, {"x": 1},
                                DictSource({**data, "e": samples_for("e", 1)}), ShardLimits(max_samples=2))
    assert other_config.reused == []


def test_crash_keeps_previous_version_and_rerun_completes(tmp_path):
    data = {p: samples_for(p, 4) for p in ("a", "b", "c")}
    first = build_corpus(tmp_path, "c", {"a": "1"}, {}, DictSource(data), ShardLimits(max_samples=3))
    inputs = {"a": "1", "b": "1", "c": "1"}
    with pytest.raises(OSError, match="disk full while writing c"):
        build_corpus(tmp_path, "c", inputs, {}, DictSource(data, fail_on="c"), ShardLimits(max_samples=3))
    version = corpus_version("c", inputs, {})
    assert latest_version(tmp_path) == first.version
    assert verify_corpus(tmp_path / first.version) == []
    assert not (tmp_path / version / "manifest.json").exists()  # not a version for readers
    assert not [p for p in (tmp_path / version / "shards").iterdir() if p.name.startswith(".")]  # no half shard
    source = DictSource(data)
    rerun = build_corpus(tmp_path, "c", inputs, {}, source, ShardLimits(max_samples=3))
    # b's shards were written into this version by the interrupted attempt: written (and resumed), not reused
    assert source.asked == ["c"] and rerun.written == ["b", "c"] and rerun.reused == ["a"]
    assert rerun.resumed == ["b"] and rerun.manifest["resumed_partitions"] == ["b"]
    assert latest_version(tmp_path) == version and verify_corpus(tmp_path / version) == []
    keys = keys_in(tmp_path / version)
    assert len(keys) == len(set(keys)) == 12


def test_verify_detects_corruption_and_missing_shards(tmp_path):
    build = build_corpus(tmp_path, "c", {"p": "1"}, {}, DictSource({"p": samples_for("p", 4)}),
                         ShardLimits(max_samples=2))
    shard = tmp_path / build.version / "shards" / "000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / build.version / "shards" / "000001.tar").unlink()
    problems = verify_corpus(tmp_path / build.version)
    assert any("000000.tar: sha256 differs" in p for p in problems)
    assert any("000001.tar: missing" in p for p in problems)


def test_memory_filesystem_store(tmp_path):
    import fsspec

    root = "memory://prefmill-test/corpora/c"
    data = {p: samples_for(p, 3) for p in ("a", "b")}
    first = build_corpus(root, "c", {"a": "1"}, {}, DictSource(data), ShardLimits(max_samples=2))
    second = build_corpus(root, "c", {"a": "1", "b": "1"}, {}, DictSource(data), ShardLimits(max_samples=2))
    assert second.written == ["b"] and second.url == f"{root}/{second.version}"
    assert CorpusStore(root).latest() == second.version
    assert verify_corpus(second.url) == []
    manifest = json.loads(fsspec.open(f"{second.url}/manifest.json", "rb").open().read())
    assert manifest["shards"][0]["path"] == f"../{first.version}/shards/000000.tar"
    fsspec.filesystem("memory").rm("/prefmill-test", recursive=True)


@pytest.fixture
def s3_bucket(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="prefmill")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield "s3://prefmill"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_s3_store_through_moto(s3_bucket):
    root = f"{s3_bucket}/corpora/c"
    data = {p: samples_for(p, 3) for p in ("a", "b")}
    first = build_corpus(root, "c", {"a": "1"}, {}, DictSource(data), ShardLimits(max_samples=2))
    second = build_corpus(root, "c", {"a": "1", "b": "1"}, {}, DictSource(data), ShardLimits(max_samples=2))
    assert second.written == ["b"] and latest_version(root) == second.version
    assert verify_corpus(second.url) == []
    assert read_manifest(second.url)["shards"][0]["path"] == f"../{first.version}/shards/000000.tar"


def test_label_0_balance_check():
    from assets.corpora import label_0_balance

    def index(labels, groups):
        return pl.DataFrame({"label_0": labels, "partition": [g[0] for g in groups], "task": [g[1] for g in groups]})

    assert label_0_balance(index([1.0, 0.0] * 5, [("p", "t2i")] * 10))[0]
    # 3 pairs: 2/3 is as close to half as it gets
    assert label_0_balance(index([1.0, 0.0, 1.0], [("p", "t2i")] * 3))[0]
    # odd groups no longer excuse an imbalance the corpus-wide alternation would have avoided
    assert not label_0_balance(index([1.0, 0.0, 1.0] * 3, [("p1", "t2i")] * 3 + [("p2", "t2i")] * 3
                                     + [("p3", "t2i")] * 3))[0]
    assert not label_0_balance(index([1.0, 1.0, 1.0, 0.0], [("p", "t2i")] * 4))[0]
    assert not label_0_balance(index([1.0] * 6 + [0.0] * 4, [("p", "t2i")] * 10))[0]  # 0.6 with even groups
