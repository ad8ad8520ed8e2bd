"""Hostile inbox files through the real entry points: ``pipelines.cli register``, the inbox sensor evaluated with
``dg.build_sensor_context``, and the ``prompt_batches`` asset materialized into tmp_path (local and remote inbox).
A file that cannot be used is skipped and reported, never stopping the others; a changed file is reported and
re-run; every dropped row is in rejects.json with its reason and line."""

import hashlib
import json
import os
import unicodedata
import uuid

import dagster as dg
import pytest
from PIL import Image

from assets.prompts import prompt_batches
from pipelines.automation import prompt_inbox_sensor
from pipelines.partitions import PROMPT_BATCH_PARTITIONS
from pipelines.resources import StorageResource, default_resources

CYRILLIC = "промпты"
CYRILLIC_KEY = f"batch-{hashlib.sha256(unicodedata.normalize('NFC', CYRILLIC).encode()).hexdigest()[:8]}"
DEEP = '{"task": "t2i", "text": "deep", "tags": ' + "[" * 50_000 + "]" * 50_000 + "}"


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def hostile_inbox(tmp_path):
    """data/inbox with three usable batch files and five that cannot be used; outside/ is not the inbox."""
    data = tmp_path / "data"
    inbox, outside = data / "inbox", tmp_path / "outside"
    outside.mkdir()
    _jsonl(inbox / "good.jsonl", [{"task": "t2i", "text": "a lighthouse"}])
    _jsonl(inbox / f"{CYRILLIC}.jsonl", [{"task": "t2i", "text": "маяк"}])
    _jsonl(inbox / "deep_then_good.jsonl", [DEEP, {"task": "t2i", "text": "a harbour"}])
    _jsonl(inbox / "deep.jsonl", [DEEP])                                     # first (only) line deeply nested
    (inbox / "utf16.jsonl").write_bytes(json.dumps({"task": "t2i", "text": "x"}).encode("utf-16"))
    os.mkfifo(inbox / "fifo.jsonl")                                          # a reader would block forever
    _jsonl(outside / "elsewhere.jsonl", [{"task": "t2i", "text": "not from the inbox"}])
    (inbox / "link.jsonl").symlink_to(outside / "elsewhere.jsonl")           # a batch file pointing out
    return data, inbox, outside


USABLE = sorted([CYRILLIC_KEY, "deep_then_good", "good"])


def test_list_inbox_keys_and_reports(hostile_inbox):
    from pipelines.inbox import list_inbox

    _, inbox, _ = hostile_inbox
    files, problems = list_inbox(str(inbox))
    assert sorted(files) == sorted(USABLE + ["deep", "utf16"])  # those two are batch_file_problem's to refuse
    assert any(p.startswith(f"{inbox / 'link.jsonl'}: path_outside_inbox: a symlink to ") for p in problems)
    assert f"{inbox / 'fifo.jsonl'}: not a regular file" in problems
    assert len(problems) == 2
    # deterministic: the same name always gets the same key
    assert list_inbox(str(inbox))[0][CYRILLIC_KEY].url == str(inbox / f"{CYRILLIC}.jsonl")
    # a link that stays inside the inbox is an ordinary batch file
    (inbox / "alias.jsonl").symlink_to(inbox / "good.jsonl")
    assert "alias" in list_inbox(str(inbox))[0]


def test_register_skips_and_reports_every_unusable_file(hostile_inbox, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    data, inbox, _ = hostile_inbox
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("PREFMILL_DATA", str(data))
    assert main(["register", "--inbox", str(inbox)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == USABLE
    skipped = sorted(line for line in err.splitlines() if line.startswith("skipped: "))
    assert len(skipped) == 4, err
    assert f"skipped: {inbox / 'deep.jsonl'}: no line is a JSON object (line 1: nesting deeper than 32" in err
    assert f"skipped: {inbox / 'utf16.jsonl'}: not UTF-8 text: UTF-16" in err
    assert f"skipped: {inbox / 'fifo.jsonl'}: not a regular file" in err
    assert f"skipped: {inbox / 'link.jsonl'}: path_outside_inbox" in err
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS)) == USABLE
        result = dg.materialize([prompt_batches], partition_key="good", instance=instance,
                                resources=default_resources(str(data)))
        assert result.success
    # unchanged: nothing more to say; changed: reported, never a second partition
    assert main(["register", "--inbox", str(inbox)]) == 0
    assert "changed" not in capsys.readouterr().err
    _jsonl(inbox / "good.jsonl", [{"task": "t2i", "text": "a lighthouse"}, {"task": "t2i", "text": "a new line"}])
    assert main(["register", "--inbox", str(inbox)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == USABLE
    changed = [line for line in err.splitlines() if line.startswith("changed: ")]
    assert len(changed) == 1 and changed[0].startswith(f"changed: {inbox / 'good.jsonl'}: content sha256 ")
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS)) == USABLE


def _tick(instance, storage, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage})
    result = prompt_inbox_sensor(context)
    return result, getattr(result, "cursor", None) or context.cursor


def test_sensor_runs_the_usable_files_reports_the_rest_and_reruns_a_changed_one(hostile_inbox):
    data, inbox, _ = hostile_inbox
    instance = dg.DagsterInstance.ephemeral()
    storage = StorageResource(root=str(data), inbox=str(inbox))
    first, cursor = _tick(instance, storage)
    assert sorted(r.partition_key for r in first.run_requests) == USABLE
    assert first.dynamic_partitions_requests[0].partition_keys == USABLE
    reported = json.loads(cursor)["reported"]
    assert {str(inbox / n) for n in ("deep.jsonl", "utf16.jsonl")} <= set(reported)
    assert any("link.jsonl: path_outside_inbox" in k for k in reported)
    assert any("fifo.jsonl: not a regular file" in k for k in reported)
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, USABLE)
    second, cursor = _tick(instance, storage, cursor)
    assert isinstance(second, dg.SkipReason) and "skipped" not in second.skip_message

    assert dg.materialize([prompt_batches], partition_key="good", instance=instance,
                          resources=default_resources(str(data))).success
    third, cursor = _tick(instance, storage, cursor)  # ingested content = file content: nothing to do
    assert isinstance(third, dg.SkipReason)
    assert "good" in json.loads(cursor)["checked"]
    _jsonl(inbox / "good.jsonl", [{"task": "t2i", "text": "a lighthouse at night"}])
    digest = hashlib.sha256((inbox / "good.jsonl").read_bytes()).hexdigest()
    fourth, cursor = _tick(instance, storage, cursor)
    assert [(r.partition_key, r.run_key) for r in fourth.run_requests] == [("good", f"good@{digest[:16]}")]
    assert not fourth.dynamic_partitions_requests  # the same partition, not a new one
    fifth, cursor = _tick(instance, storage, cursor)  # reported and requested once
    assert isinstance(fifth, dg.SkipReason)


def _materialize(data, key, instance=None, inbox=None):
    instance = instance or dg.DagsterInstance.ephemeral()
    if key not in instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS):
        instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, [key])
    run_config = {"ops": {"prompt_batches": {"config": {"inbox": inbox}}}} if inbox else None
    return dg.materialize([prompt_batches], partition_key=key, instance=instance, raise_on_error=False,
                          resources=default_resources(str(data)), run_config=run_config)


def _bomb_png(width, height):
    """A PNG header declaring width x height over a stub IDAT: a decompression bomb's first bytes."""
    import struct
    import zlib

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _png(path, size=(32, 32), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_asset_keeps_good_rows_and_lists_each_rejected_line(tmp_path):
    data = tmp_path / "data"
    inbox, outside = data / "inbox", tmp_path / "outside"
    _png(inbox / "batches" / "src.png")
    _png(inbox / "images" / "ref.png", color=(0, 0, 255))
    _png(inbox / "batches" / "dot.png", size=(1, 1))
    _png(outside / "secret.png", color=(1, 2, 3))
    (inbox / "batches" / "escape.png").symlink_to(outside / "secret.png")
    (inbox / "batches" / "bomb.png").write_bytes(_bomb_png(30_000, 30_000))
    lines = [
        json.dumps({"task": "t2i", "text": "a red fox"}),                                            # 1 kept
        DEEP,                                                                                        # 2
        json.dumps({"task": "edit", "text": "make it blue", "source_image": "src.png"}),             # 3 kept
        json.dumps({"task": "multi_ref", "text": "in this style", "reference_images": ["../images/ref.png"],
                    "reference_types": ["style"]}),                                                  # 4 kept
        json.dumps({"task": "edit", "text": "out", "source_image": "../../../outside/secret.png"}),   # 5
        json.dumps({"task": "edit", "text": "link", "source_image": "escape.png"}),                  # 6
        json.dumps({"task": "edit", "text": "abs", "source_image": str(outside / "secret.png")}),    # 7
        json.dumps({"task": "edit", "text": "tiny", "source_image": "dot.png"}),                     # 8
        json.dumps({"task": "edit", "text": "bomb", "source_image": "bomb.png"}),                    # 9
        '{"task": "t2i", "text": "n", "w": NaN}',                                                    # 10
        json.dumps({"task": "t2i", "text": "rtl \u202e"}),                                           # 11
        json.dumps({"task": "t2i", "text": "a  red fox", "split": "heldout"}),                       # 12
    ]
    (inbox / "batches").mkdir(parents=True, exist_ok=True)
    (inbox / "batches" / "mixed.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    result = _materialize(data, "mixed")
    assert result.success
    meta = result.asset_materializations_for_node("prompt_batches")[0].metadata
    assert meta["num_prompts"].value == 3 and meta["dropped"].value == 9
    rejects = json.loads((data / "prompt_batches" / "mixed" / "rejects.json").read_text())
    assert rejects["drops"] == {"json_too_deep": 1, "path_outside_inbox": 3, "image_too_small": 1,
                                "image_too_large": 1, "non_finite_number": 1, "control_character": 1,
                                "split_conflict": 1}
    assert [(r["line"], r["reason"]) for r in rejects["rejected"]] == [
        (2, "json_too_deep"), (5, "path_outside_inbox"), (6, "path_outside_inbox"), (7, "path_outside_inbox"),
        (8, "image_too_small"), (9, "image_too_large"), (10, "non_finite_number"), (11, "control_character"),
        (12, "split_conflict")]
    assert rejects["kept"] == 3 and rejects["lines"] == 12
    assert rejects["source_sha256"] == meta["source_sha256"].value == hashlib.sha256(
        (inbox / "batches" / "mixed.jsonl").read_bytes()).hexdigest()
    assert rejects["limits"]["max_pixels"] == 16_777_216
    assert "| 5 | path_outside_inbox |" in meta["rejected_lines"].value
    images = list((data / "prompt_batches" / "mixed" / "images").iterdir())
    assert len(images) == 2 and (outside / "secret.png").read_bytes() not in {p.read_bytes() for p in images}


def test_asset_refuses_a_symlinked_batch_and_runs_a_non_ascii_one(hostile_inbox):
    data, _, _ = hostile_inbox
    instance = dg.DagsterInstance.ephemeral()
    linked = _materialize(data, "link", instance)
    assert not linked.success
    message = linked.failure_data_for_node("prompt_batches").error.message
    assert "no batch file link.jsonl" in message and "path_outside_inbox" in message
    assert not (data / "prompt_batches" / "link" / "prompts.parquet").exists()
    named = _materialize(data, CYRILLIC_KEY, instance)
    assert named.success
    assert (data / "prompt_batches" / CYRILLIC_KEY / "prompts.parquet").exists()
    deep = _materialize(data, "deep_then_good", instance)  # the deep first line costs that line only
    assert deep.success
    rejects = json.loads((data / "prompt_batches" / "deep_then_good" / "rejects.json").read_text())
    assert rejects["drops"] == {"json_too_deep": 1} and rejects["kept"] == 1


def test_a_prompt_in_both_splits_across_partitions(tmp_path):
    data = tmp_path / "data"
    _jsonl(data / "inbox" / "a.jsonl", [{"task": "t2i", "text": "a red fox", "split": "train"}])
    _jsonl(data / "inbox" / "b.jsonl", [{"task": "t2i", "text": "a  red\tfox", "split": "heldout"},
                                        {"task": "t2i", "text": "a blue fox", "split": "heldout"}])
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(data, "a", instance).success
    assert _materialize(data, "b", instance).success
    rejects = json.loads((data / "prompt_batches" / "b" / "rejects.json").read_text())
    assert rejects["drops"] == {"split_conflict": 1} and rejects["rejected"][0]["line"] == 1
    assert "partition a" in rejects["rejected"][0]["detail"]
    import polars as pl

    assert pl.read_parquet(data / "prompt_batches" / "b" / "prompts.parquet")["text"].to_list() == ["a blue fox"]


def test_remote_inbox_stages_only_images_inside_it(tmp_path):
    import fsspec

    from pipelines.io import encode_image

    tag = uuid.uuid4().hex[:8]
    fs = fsspec.filesystem("memory")
    inbox = f"memory://inbox-{tag}"
    ok = encode_image(Image.new("RGB", (32, 32), (0, 255, 0)))
    secret = encode_image(Image.new("RGB", (32, 32), (1, 2, 3)))
    fs.pipe(f"/inbox-{tag}/images/ok.png", ok)
    fs.pipe(f"/inbox-{tag}/images/dot.png", encode_image(Image.new("RGB", (1, 1))))
    fs.pipe(f"/outside-{tag}/secret.png", secret)
    rows = [
        {"task": "edit", "text": "inside", "source_image": "../images/ok.png"},                      # 1 kept
        {"task": "edit", "text": "dot-dot out", "source_image": f"../../outside-{tag}/secret.png"},  # 2
        {"task": "edit", "text": "absolute", "source_image": f"/outside-{tag}/secret.png"},          # 3
        {"task": "edit", "text": "url", "source_image": f"memory://outside-{tag}/secret.png"},       # 4
        {"task": "edit", "text": "gone", "source_image": "../images/missing.png"},                   # 5
        {"task": "edit", "text": "tiny", "source_image": "../images/dot.png"},                      # 6
    ]
    fs.pipe(f"/inbox-{tag}/prompts/remote.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    data = tmp_path / "data"
    try:
        result = _materialize(data, "remote", inbox=inbox)
        assert result.success
    finally:
        fs.rm(f"/inbox-{tag}", recursive=True)
        fs.rm(f"/outside-{tag}", recursive=True)
    rejects = json.loads((data / "prompt_batches" / "remote" / "rejects.json").read_text())
    assert [(r["line"], r["reason"]) for r in rejects["rejected"]] == [
        (2, "path_outside_inbox"), (3, "path_outside_inbox"), (4, "bad_image"), (5, "missing_image"),
        (6, "image_too_small")]
    staged = [p for p in (data / "prompt_batches" / "remote" / "staging").rglob("*") if p.is_file()]
    assert secret not in {p.read_bytes() for p in staged}
    assert sorted(p.name for p in staged) == ["dot.png", "ok.png", "remote.jsonl"]


def test_sensor_reruns_a_fixed_file_whose_first_run_failed(tmp_path):
    data = tmp_path / "data"
    inbox = data / "inbox"
    _jsonl(inbox / "allbad.jsonl", [{"task": "video", "text": "x"}])  # a batch, but no usable row
    instance = dg.DagsterInstance.ephemeral()
    storage = StorageResource(root=str(data), inbox=str(inbox))
    first, cursor = _tick(instance, storage)
    assert [r.partition_key for r in first.run_requests] == ["allbad"]
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, ["allbad"])
    failed = _materialize(data, "allbad", instance)
    assert not failed.success and "no usable prompt rows" in failed.failure_data_for_node("prompt_batches").error.message
    rejects = json.loads((data / "prompt_batches" / "allbad" / "rejects.json").read_text())
    assert rejects["drops"] == {"unknown_task": 1}
    second, cursor = _tick(instance, storage, cursor)
    assert isinstance(second, dg.SkipReason)
    _jsonl(inbox / "allbad.jsonl", [{"task": "t2i", "text": "fixed"}])
    digest = hashlib.sha256((inbox / "allbad.jsonl").read_bytes()).hexdigest()
    third, cursor = _tick(instance, storage, cursor)
    assert [(r.partition_key, r.run_key) for r in third.run_requests] == [("allbad", f"allbad@{digest[:16]}")]
    assert _materialize(data, "allbad", instance).success
    fourth, _ = _tick(instance, storage, cursor)
    assert isinstance(fourth, dg.SkipReason)
