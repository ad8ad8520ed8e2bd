"""Versioned, incrementally refreshed WebDataset corpora on any fsspec filesystem (DESIGN.md "Data contracts"): the
writer. The format it writes (paths, manifest, shard entries, segment records, ``latest``) is defined once in
:mod:`pipelines.corpus_format`, which the readers (:mod:`trainers.data`, :mod:`pipelines.export`) use too.

The version is a content hash of the input partitions' fingerprints and the config. Each input partition becomes
one *segment*: its own shards, cut per layout (task + member names, see :func:`sample_layout`) at
``max_samples`` samples or ``max_bytes`` bytes. A refresh that adds partitions references the shards of the
unchanged partitions in the previous version (``../<old version>/shards/000003.tar``) and writes only new ones.
Cross-partition state (near-duplicate memory) depends on the partitions before a segment, so only the longest
unchanged prefix of partitions in sorted order is reused: the result is exactly what a build from scratch writes.

Crash safety without directory renames (object stores have none): every file is written atomically (local: temp
sibling, fsync, rename; remote: a single PUT of a finished temp file), a partition's segment record is written
after its shards, the index and the dataset card (``README.md``) after every segment, and ``manifest.json`` after
everything else: a version without a manifest does not exist for readers (and one with a manifest has its card),
and ``latest`` moves only after the manifest. A re-run reuses the finished segments.

Each segment record holds the JSON type of every JSON member of its samples (``json_types``: the union of the
fields, one type each, see :mod:`pipelines.dataset_card`; a source may declare types through an optional
``json_types(partition)`` method, which fills fields that were null in every sample). Samples whose JSON fields
cannot share a type (a string in one, a number in another) fail the build: such a corpus would not load as one
dataset.

One module over ~500 lines: the store, the shard cutting, the build and its check are one commit protocol (the
order in which :func:`build_corpus` writes through :class:`CorpusStore` is what makes a crash leave the previous
version readable), kept in one place so that order can be read whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from labelers.hashing import content_id
from pipelines.corpus_format import (  # noqa: F401 - latest_version, version_url: the writer's callers read them here
    CARD,
    INDEX,
    LATEST,
    MANIFEST,
    SCHEMA_VERSION,
    corpus_version,
    latest_bytes,
    json_bytes,
    latest_version,
    open_file,
    parse_latest,
    parse_manifest,
    read_index,
    read_manifest,
    rebase,
    rebase_segment,
    segment_record,
    segment_rel,
    shard_entry,
    shard_path,
    shard_url,
    version_url,
)
from pipelines.dataset_card import (
    card_text,
    fill_nulls,
    merge_member_types,
    merge_types,
    sample_json_types,
    scan_json_types,
    write_dataset_card,
)

TAR_BLOCK = 512

Sample = dict[str, Any]
IndexRow = dict[str, Any]


@dataclass(frozen=True)
class ShardLimits:
    """Where a shard is cut: after ``max_samples`` samples, or before it would pass ``max_bytes`` (a sample larger
    than ``max_bytes`` gets a shard of its own)."""

    max_samples: int = 1000
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.max_bytes is not None and self.max_bytes < TAR_BLOCK * 4:
            raise ValueError(f"max_bytes must be >= {TAR_BLOCK * 4}, got {self.max_bytes}")


# ------------------------------------------------------------------------------------------------ storage
class CorpusStore:
    """One corpus root on an fsspec filesystem; every write is atomic (see the module docstring)."""

    def __init__(self, root: str | Path):
        import fsspec

        self.url = str(root).rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.local = "file" in _protocols(self.fs)

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _abs(self, rel: str) -> str:
        return posixpath.join(self.path, rel)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._abs(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._abs(rel))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self._abs(rel), mode)

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[Any]:
        """A binary file to write ``rel`` through; it appears complete or not at all."""
        import tempfile

        from pipelines.io import atomic_path

        if self.local:
            with atomic_path(Path(self._abs(rel))) as tmp, open(tmp, "wb") as handle:
                yield handle
            return
        with tempfile.NamedTemporaryFile(prefix="prefmill-", suffix=".part") as tmp:
            with open(tmp.name, "wb") as handle:
                yield handle
            self.fs.put_file(tmp.name, self._abs(rel))  # one PUT: object stores publish whole objects only

    def staging_file(self, rel: str) -> Path:
        """A fresh temporary file to write ``rel``'s content into before :meth:`publish`: a hidden sibling of the
        destination on a local store (so the publishing rename stays on one filesystem), else a local temp file."""
        import tempfile

        from pipelines.io import temp_prefix

        if self.local:
            final = Path(self._abs(rel))
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=temp_prefix(final.name), suffix=".tmp", dir=final.parent)
        else:
            fd, name = tempfile.mkstemp(prefix="prefmill-", suffix=".part")
        import os

        os.close(fd)
        return Path(name)

    def publish(self, staged: Path, rel: str) -> dict[str, Any]:
        """Hash ``staged`` (read back from the page cache), make it durable and move it to ``rel`` in one step
        (local: fsync + rename + fsync of the directory; remote: one PUT); returns its sha256 and size. Runs in
        a worker thread: hashing, fsync and uploads release the GIL, so the next shard is written meanwhile on
        another core."""
        import os

        from pipelines.io import file_sha256, fsync_dir

        try:
            info = {"sha256": file_sha256(staged), "bytes": staged.stat().st_size}
            if self.local:
                with open(staged, "rb") as handle:
                    os.fsync(handle.fileno())
                final = Path(self._abs(rel))
                os.replace(staged, final)
                fsync_dir(final.parent)
            else:
                self.fs.put_file(str(staged), self._abs(rel))
            return info
        finally:
            if staged.exists():
                staged.unlink()

    def remove_stale_temps(self, rels: Iterable[str], started_at: float | None = None,
                           log: Callable[[str], None] | None = None) -> list[Path]:
        """Remove the temps killed writers left in the folders ``rels`` of a local store (staged shards, segment
        records, index, manifest, ``latest``): only those whose owner process is gone, or that name none and are
        older than ``started_at`` (:func:`pipelines.io.remove_stale_temps`). A remote store stages in local temp
        files that are never visible under the root; nothing to do there."""
        from pipelines.io import remove_stale_temps

        if not self.local:
            return []
        removed: list[Path] = []
        for rel in rels:
            removed += remove_stale_temps(Path(self._abs(rel)), started_at, log)
        return removed

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._abs(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_atomic(rel) as handle:
            handle.write(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json_bytes(obj))

    def write_parquet(self, rel: str, df) -> None:
        with self.open_atomic(rel) as handle:
            df.write_parquet(handle)

    def read_parquet(self, rel: str):
        import polars as pl

        with self.open(rel) as handle:
            return pl.read_parquet(handle)

    def latest(self) -> str | None:
        return parse_latest(self.read_bytes(LATEST), self.url_of(LATEST)) if self.exists(LATEST) else None

    def point_latest(self, version: str) -> None:
        self.write_bytes(LATEST, latest_bytes(version))

    def manifest(self, version: str | None) -> dict[str, Any] | None:
        rel = f"{version}/{MANIFEST}"
        if not version or not self.exists(rel):
            return None
        return parse_manifest(self.read_bytes(rel), self.url_of(rel))


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


# ------------------------------------------------------------------------------------------------ shards
def sample_layout(sample: Sample, row: IndexRow) -> str:
    """A shard holds samples of one layout: the same task and the same members. Readers that infer a schema
    from the first samples (``datasets.load_dataset("webdataset", ...)``) need that: members and JSON fields
    that differ between samples of one shard make them fail."""
    members = ",".join(sorted(k for k in sample if not k.startswith("__")))
    return f"{row.get('task', 'any')}:{members}"


def sample_bytes(sample: Sample) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
    total = 0
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        size = len(value) if isinstance(value, (bytes, bytearray)) else len(str(value).encode())
        total += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK
    return total


def _chunks(samples: Iterable[tuple[Sample, IndexRow]], limits: ShardLimits) -> Iterator[tuple[str, list]]:
    """Group samples by layout and cut each group at the limits (streaming: one open chunk per layout)."""
    pending: dict[str, list] = {}
    sizes: dict[str, int] = {}
    for sample, row in samples:
        layout = sample_layout(sample, row)
        size = sample_bytes(sample)
        chunk = pending.setdefault(layout, [])
        if chunk and limits.max_bytes is not None and sizes[layout] + size > limits.max_bytes:
            yield layout, pending.pop(layout)
            chunk = pending.setdefault(layout, [])
            sizes[layout] = 0
        chunk.append((sample, row))
        sizes[layout] = sizes.get(layout, 0) + size
        if len(chunk) >= limits.max_samples:
            yield layout, pending.pop(layout)
            sizes[layout] = 0
    for layout in sorted(pending):
        yield layout, pending[layout]


def _write_shard(store: CorpusStore, rel: str, samples: list[Sample]) -> Path:
    """Write one shard into a staging file (to be published by :meth:`CorpusStore.publish`)."""
    from pipelines.io import shard_writer

    staged = store.staging_file(rel)
    try:
        with open(staged, "wb") as handle, shard_writer(handle) as sink:
            for sample in samples:
                sink.write(sample)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


# ------------------------------------------------------------------------------------------------ building
class PartitionSource(Protocol):
    """What a corpus is built from, one input partition at a time."""

    def samples(self, partition: str, drops: Counter) -> Iterable[tuple[Sample, IndexRow]]:
        """The partition's ``(sample, index row)`` pairs; every dropped row counted in ``drops`` by reason."""

    def reused(self, partition: str, index_rows) -> None:
        """A segment taken as it is (from the previous version, or finished before a crash): its index rows,
        so state that later partitions depend on (duplicate memory) can be rebuilt."""

    # Optional: ``json_types(partition) -> {member: JSON type}``, the types the source declares for the JSON
    # members of the partition it just yielded (e.g. from its parquet schema); see pipelines.dataset_card.


@dataclass
class CorpusBuild:
    """``written``: partitions whose shards this version holds itself (``<version>/shards``); ``reused``: those
    referencing an older version's shards; ``resumed``: the part of ``written`` an interrupted earlier attempt at
    this version had finished and this one kept (see :func:`build_corpus`)."""

    version: str
    url: str
    manifest: dict[str, Any]
    created: bool
    written: list[str]
    reused: list[str]
    resumed: list[str] = field(default_factory=list)


def build_corpus(
    corpus_root: str | Path,
    corpus: str,
    inputs: dict[str, str],
    config: dict[str, Any],
    source: PartitionSource,
    limits: ShardLimits,
    manifest_extra: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> CorpusBuild:
    """Build (or reuse) the version of ``corpus`` for ``inputs`` (partition -> fingerprint) and ``config``, then
    point ``latest`` at it. Unchanged leading partitions of the previous ``latest`` are referenced, finished
    segments of an interrupted build of the same version are kept, everything else is written.

    The manifest says where each partition's shards come from, the same for a build that ran through and one
    that resumed after a kill (at any point, including between a segment record and the manifest):

    - ``written_partitions``: partitions whose shards this version wrote into its own ``shards/`` folder — in
      this attempt, or in an interrupted earlier attempt at this same version (whose segment record, written
      after the segment's shards, this attempt kept);
    - ``reused_partitions``: partitions whose shards an older version wrote and this one references
      (``../<old version>/shards/...``);
    - ``resumed_partitions``: the part of ``written_partitions`` an interrupted attempt had finished (empty for
      a build that ran start to end) — so a resumed build is recognisable, and its ``written_partitions`` still
      equal those of a build that was never interrupted.

    Temps left by a killed build (staged shards, records, index, manifest, ``latest``) are removed first when
    their writer is gone (:meth:`CorpusStore.remove_stale_temps`)."""
    import time

    import polars as pl

    started_at = time.time()
    store = CorpusStore(corpus_root)
    version = corpus_version(corpus, inputs, config)
    store.remove_stale_temps(["", version, f"{version}/shards", f"{version}/segments"], started_at, log)
    existing = store.manifest(version)
    if existing is not None:
        if not store.exists(f"{version}/{CARD}"):  # a version committed by a writer that wrote no card
            write_dataset_card(store.url_of(version))
        if store.latest() != version:
            store.point_latest(version)
        return CorpusBuild(version, store.url_of(version), existing, False, [], sorted(inputs))

    previous_version = store.latest()
    previous = store.manifest(previous_version)
    config_id = content_id(config)
    reusable = _reusable_prefix(previous, inputs, config_id)
    previous_index = store.read_parquet(f"{previous_version}/{INDEX}") if reusable else None

    next_seq = 0
    segments: dict[str, dict[str, Any]] = {}
    frames: list[Any] = []
    written, reused, resumed = [], [], []
    for partition in sorted(inputs):
        record_rel = segment_rel(version, partition)
        record = _read_json(store, record_rel + ".json")
        if partition in reusable:
            segment = rebase_segment(previous["segments"][partition], previous_version)
            old_paths = [shard_path(shard) for shard in previous["segments"][partition]["shards"]]
            rows = previous_index.filter(pl.col("shard").is_in(old_paths)).with_columns(
                pl.col("shard").map_elements(lambda p: rebase(p, previous_version), return_dtype=pl.String))
            reused.append(partition)
            if record is not None:
                # An interrupted attempt wrote this segment when `latest` could not lend it; now it is referenced
                # and its shard numbers go to later segments, so the record must never be taken again.
                store.delete(record_rel + ".json")
        elif record is not None and record.get("fingerprint") == inputs[partition]:
            segment = record
            rows = store.read_parquet(record_rel + ".parquet")
            next_seq = max([next_seq] + [shard["seq"] + 1 for shard in segment["shards"]])
            written.append(partition)
            resumed.append(partition)
            log(f"{corpus} {version}: partition {partition} finished before an interruption; kept")
        else:
            segment, rows = _write_segment(store, version, partition, inputs[partition], source, limits, next_seq)
            next_seq += len(segment["shards"])
            store.write_parquet(record_rel + ".parquet", rows)
            store.write_json(record_rel + ".json", segment)  # the segment's commit
            written.append(partition)
            log(f"{corpus} {version}: partition {partition}: {segment['num_samples']} samples in "
                f"{len(segment['shards'])} new shards")
        if partition in reused or partition in resumed:
            source.reused(partition, rows)
        segments[partition] = segment
        frames.append(rows)

    index = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame(
        schema={"shard": pl.String, "key": pl.String, "partition": pl.String})
    shards = [shard for partition in sorted(segments) for shard in segments[partition]["shards"]]
    layouts: dict[str, list[str]] = {}
    for shard in shards:
        layouts.setdefault(shard["layout"], []).append(shard["path"])
    drops: Counter = Counter()
    for segment in segments.values():
        drops.update(segment["drops"])
    json_types = _version_json_types(store, version, segments)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "corpus": corpus,
        "version": version,
        "previous_version": previous_version,
        "config_id": config_id,
        "config": config,
        "inputs": sorted(inputs),
        "num_samples": len(index),
        "num_bytes": sum(shard["bytes"] for shard in shards),
        "shards": shards,
        "layouts": layouts,
        "segments": segments,
        "drops": dict(sorted(drops.items())),
        "written_partitions": written,
        "reused_partitions": reused,
        "resumed_partitions": resumed,
        "limits": {"max_samples": limits.max_samples, "max_bytes": limits.max_bytes},
        "dedup": getattr(source, "dedup_mode", None),  # {"exact": bool}: which near-duplicate search built it
        "json_types": json_types,  # member -> JSON type over every sample (the dataset card's features)
        "card": CARD,
        **(manifest_extra or {}),
    }
    store.write_parquet(f"{version}/{INDEX}", index)
    store.write_bytes(f"{version}/{CARD}", card_text(manifest).encode("utf-8"))
    store.write_json(f"{version}/{MANIFEST}", manifest)  # the version's commit
    store.point_latest(version)
    return CorpusBuild(version, store.url_of(version), manifest, True, written, reused, resumed)


def _write_segment(store: CorpusStore, version: str, partition: str, fingerprint: str, source: PartitionSource,
                   limits: ShardLimits, first_seq: int) -> tuple[dict[str, Any], Any]:
    import polars as pl

    from concurrent.futures import ThreadPoolExecutor

    drops: Counter = Counter()
    shards: list[dict[str, Any]] = []
    rows: list[IndexRow] = []
    json_types: dict[str, Any] = {}
    seq = first_seq
    # One publisher thread: shard k is hashed, fsynced and renamed (or uploaded) while shard k+1 is written.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-shard") as publisher:
        published = []
        for layout, chunk in _chunks(source.samples(partition, drops), limits):
            for sample, _ in chunk:
                merge_member_types(json_types, sample_json_types(sample),
                                   f"partition {partition}, sample {sample.get('__key__')}: ")
            entry = shard_entry(seq, layout, partition, len(chunk))
            path = entry["path"]
            staged = _write_shard(store, f"{version}/{path}", [sample for sample, _ in chunk])
            published.append(publisher.submit(store.publish, staged, f"{version}/{path}"))
            shards.append(entry)
            rows.extend({**row, "shard": path, "key": sample["__key__"], "partition": partition}
                        for sample, row in chunk)
            seq += 1
        for shard, future in zip(shards, published):
            shard.update(future.result())  # re-raises a failed publish
    frame = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame(
        schema={"shard": pl.String, "key": pl.String, "partition": pl.String})
    declared = source.json_types(partition) if callable(getattr(source, "json_types", None)) else None
    for member, hint in (declared or {}).items():
        if member in json_types:
            json_types[member] = fill_nulls(json_types[member], hint)
    return segment_record(partition, fingerprint, shards, len(rows), drops, json_types), frame


def _version_json_types(store: CorpusStore, version: str, segments: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """member -> JSON type over every segment of a version (partitions in sorted order). A segment recorded
    without types (written by an older writer) is read from its shards."""
    types: dict[str, Any] = {}
    for partition in sorted(segments):
        segment = segments[partition]
        found = segment.get("json_types")
        if found is None:
            found = scan_json_types(store.url_of(version), {"shards": segment["shards"]})
        for member, kind in found.items():
            types[member] = merge_types(types[member], kind, f"{member} (partition {partition})") \
                if member in types else kind
    return types


def _reusable_prefix(previous: dict[str, Any] | None, inputs: dict[str, str], config_id: str) -> set[str]:
    """Partitions whose segments the previous version can lend: same config, and the longest run of partitions
    (sorted) with unchanged fingerprints in both versions."""
    if not previous or previous.get("schema_version") != SCHEMA_VERSION or previous.get("config_id") != config_id:
        return set()
    before = sorted(previous.get("segments", {}))
    now = sorted(inputs)
    prefix: set[str] = set()
    for old, new in zip(before, now):
        if old != new or previous["segments"][old]["fingerprint"] != inputs[new]:
            break
        prefix.add(new)
    return prefix


def _read_json(store: CorpusStore, rel: str) -> dict[str, Any] | None:
    return json.loads(store.read_bytes(rel)) if store.exists(rel) else None


# ------------------------------------------------------------------------------------------------ checking
def _tar_keys(handle) -> list[str]:
    """Sample keys of a tar stream, grouped as webdataset groups members (key = name up to the first dot of the
    base name, consecutive members of one key form a sample)."""
    import tarfile

    keys: list[str] = []
    with tarfile.open(fileobj=handle, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, base = posixpath.split(member.name)
            key = posixpath.join(directory, base.split(".", 1)[0]) if "." in base else member.name
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


class _HashingReader:
    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.sha256.update(data)
        return data


def verify_corpus(version_dir: str | Path) -> list[str]:
    """Re-read every shard once: its sha256 and sample count must match the manifest, keys must be unique, and
    the index must name exactly the samples in the shards. Returns the problems (empty when intact)."""
    manifest = read_manifest(version_dir)
    problems: list[str] = []
    keys: list[str] = []
    for shard in manifest["shards"]:
        path = shard_path(shard)
        try:
            with open_file(shard_url(version_dir, shard)) as handle:
                reader = _HashingReader(handle)
                shard_keys = _tar_keys(reader)
                while reader.read(1 << 20):  # hash the end-of-archive padding too
                    pass
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if reader.sha256.hexdigest() != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        if len(shard_keys) != shard["count"]:
            problems.append(f"{path}: {len(shard_keys)} samples, manifest says {shard['count']}")
        keys += shard_keys
    index = read_index(version_dir)
    if index is None:
        problems.append(f"{INDEX}: missing")
    elif sorted(index["key"].to_list()) != sorted(keys):
        problems.append(f"index.parquet lists {len(index)} samples, the shards hold {len(keys)}")
    if len(set(keys)) != len(keys):
        problems.append(f"{len(keys) - len(set(keys))} duplicate sample keys")
    if manifest.get("num_samples") != len(keys):
        problems.append(f"manifest says {manifest.get('num_samples')} samples, the shards hold {len(keys)}")
    return problems
