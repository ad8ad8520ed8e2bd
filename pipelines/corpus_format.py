"""The corpus format, one definition for the writer (:mod:`pipelines.corpora`) and every reader
(:mod:`trainers.data`, :mod:`pipelines.export`, :mod:`pipelines.dataset_card`): where a corpus keeps its files,
what ``manifest.json``, a shard entry, a segment record and the ``latest`` pointer hold, and how they are read.

A corpus root (a local directory or an fsspec URL such as ``s3://bucket/corpora/sft_corpus``) holds::

    latest                                  the committed version a reader should use (written last)
    <version>/manifest.json                 the commit of a version (written after everything below)
    <version>/index.parquet                 one row per sample: shard (path as in the manifest), key, partition, ...
    <version>/README.md                     the dataset card (:mod:`pipelines.dataset_card`)
    <version>/shards/NNNNNN.tar             the shards this version wrote
    <version>/segments/<p>.{parquet,json}   per-partition records, so a crashed build resumes

The manifest's ``shards`` is a list of shard entries in corpus order; an entry's ``path`` is relative to the
version directory and may point into an older version (``../<older>/shards/000002.tar``: a refresh references
the shards of unchanged partitions). Manifests of schema 1-2 named a shard by file name only (``shard``, under
``shards/``); :func:`shard_path` reads both. Nothing else is a manifest: a directory without ``manifest.json`` is
not a committed version (the writer writes it last), so readers never guess shards from ``index.parquet`` or a
``shards/*.tar`` listing.

Dagster-free, and light at import: the standard library only; fsspec, polars and the project's hashing helpers
are imported inside functions.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

# 3: jpg_0 alternates through the whole preference corpus; 4: SFT samples carry src/ref images, pairs generator ids;
# 5: JSON members typed the same in every task (segments and manifest record ``json_types``), README.md dataset card
SCHEMA_VERSION = 5
LATEST = "latest"
MANIFEST = "manifest.json"
INDEX = "index.parquet"
CARD = "README.md"
SHARDS = "shards"
SEGMENTS = "segments"


# ------------------------------------------------------------------------------------------------ locations
def is_url(path: Any) -> bool:
    """``scheme://...`` (fsspec, possibly chained as ``simplecache::s3://...``); anything else is a local path."""
    return isinstance(path, str) and "://" in path


def location(path: str | os.PathLike) -> str:
    """A URL as it is, a local path as a string."""
    return path if is_url(path) else os.fspath(path)


def join(base: str | os.PathLike, rel: str) -> str:
    """``rel`` resolved against the directory ``base`` with posix normalisation (``..`` collapsed).

    Local paths become absolute; URLs keep their scheme prefix, so ``s3://b/c/v2`` + ``../v1/shards/x.tar`` is
    ``s3://b/c/v1/shards/x.tar``; a URL path may not climb above its root."""
    base = location(base)
    if not is_url(base):
        return os.path.normpath(os.path.join(os.path.abspath(base), rel))
    prefix, _, rest = base.rstrip("/").partition("://")
    joined = posixpath.normpath(posixpath.join(rest, rel))
    if joined == ".." or joined.startswith("../"):
        raise ValueError(f"{rel!r} points above the root of {base!r}")
    return f"{prefix}://{joined}"


def version_url(corpus_root: str | os.PathLike, version: str) -> str:
    """The directory of ``version`` under a corpus root (no normalisation: a URL stays as it was given)."""
    return f"{str(corpus_root).rstrip('/')}/{version}"


def corpus_version(corpus: str, inputs: dict[str, str], config: dict[str, Any]) -> str:
    """The version id: a content hash of the corpus name, the schema, the input partitions' fingerprints
    (``inputs``: partition -> fingerprint of the files it contributed) and the config."""
    from labelers.hashing import content_id

    return content_id("corpus", corpus, SCHEMA_VERSION, sorted(inputs.items()), config)[:16]


# ------------------------------------------------------------------------------------------------ shards
def shard_name(seq: int) -> str:
    """The file name of shard number ``seq`` of a version: ``NNNNNN.tar``."""
    return f"{seq:06d}.tar"


def shard_entry(seq: int, layout: str, partition: str, count: int) -> dict[str, Any]:
    """A manifest / segment record shard entry, before publishing adds its ``sha256`` and ``bytes``."""
    return {"path": f"{SHARDS}/{shard_name(seq)}", "shard": shard_name(seq), "seq": seq, "layout": layout,
            "partition": partition, "count": count}


def shard_path(shard: dict[str, Any]) -> str:
    """A shard entry's path relative to its version directory (schema 1-2 entries: ``shards/<shard>``)."""
    return shard.get("path") or f"{SHARDS}/{shard['shard']}"


def shard_url(version_dir: str | os.PathLike, shard: dict[str, Any]) -> str:
    """Where a shard entry of the version in ``version_dir`` is (local path or URL)."""
    return join(version_dir, shard_path(shard))


def rebase(path: str, previous_version: str) -> str:
    """A shard path relative to the previous version's directory, made relative to a sibling version's."""
    return posixpath.normpath(posixpath.join("..", previous_version, path))


# ------------------------------------------------------------------------------------------------ segments
def segment_name(partition: str) -> str:
    """The file stem of a partition's segment record: readable, and unique per partition name."""
    from labelers.hashing import content_id
    from pipelines.paths import safe_key

    return f"{safe_key(partition)}-{content_id(partition)[:8]}"


def segment_rel(version: str, partition: str) -> str:
    """A partition's segment record in ``version``, without extension (``.json``: the record; ``.parquet``: its
    index rows)."""
    return f"{version}/{SEGMENTS}/{segment_name(partition)}"


def segment_record(partition: str, fingerprint: str, shards: list[dict[str, Any]], num_samples: int,
                   drops: dict[str, int], json_types: dict[str, Any]) -> dict[str, Any]:
    """What a segment record holds: the partition, the fingerprint it was built from, its shard entries, its
    samples, its drops by reason and the JSON types of its samples (:mod:`pipelines.dataset_card`)."""
    return {"partition": partition, "fingerprint": fingerprint, "shards": shards, "num_samples": num_samples,
            "drops": dict(sorted(drops.items())), "json_types": json_types}


def rebase_segment(segment: dict[str, Any], previous_version: str) -> dict[str, Any]:
    """A segment of the previous version as a newer version references it (shard paths through ``../``)."""
    shards = [{**shard, "path": rebase(shard_path(shard), previous_version)} for shard in segment["shards"]]
    return {**segment, "shards": shards}


# ------------------------------------------------------------------------------------------------ reading
def open_file(path: str, storage_options: dict | None = None):
    """A readable binary file object for a local path or an fsspec URL (the caller closes it)."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb", **(storage_options or {})).open()
    return open(path, "rb")


def read_bytes(path: str, storage_options: dict | None = None) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        with open_file(path, storage_options) as handle:
            return handle.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def json_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """``manifest`` when it has the shape the writer writes (a mapping whose ``shards`` is a list of entries,
    each naming a relative ``path`` or, schema 1-2, a ``shard`` file name); else ``ValueError`` naming
    ``where``."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: a manifest is a JSON object, not {type(manifest).__name__}")
    shards = manifest.get("shards", [])
    if not isinstance(shards, list):
        raise ValueError(f"{where}: 'shards' must be a list of shard entries, not {type(shards).__name__}")
    for n, shard in enumerate(shards):
        name = shard.get("path") or shard.get("shard") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: shard entry {n} names no 'path': {shard!r}")
        if is_url(name) or name.startswith("/"):
            raise ValueError(f"{where}: shard entry {n}: {name!r} is not relative to the version directory")
    return manifest


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{where} is not JSON: {exc}") from exc
    return check_manifest(manifest, where)


def read_manifest(version_dir: str | os.PathLike, *, storage_options: dict | None = None) -> dict[str, Any]:
    """The manifest of a version directory (local path or URL); ``FileNotFoundError`` when there is none (not a
    committed version), ``ValueError`` when it is not a manifest."""
    where = join(version_dir, MANIFEST)
    data = read_bytes(where, storage_options)
    if data is None:
        raise FileNotFoundError(f"{where} does not exist: {location(version_dir)} is not a committed corpus version")
    return parse_manifest(data, where)


def read_index(version_dir: str | os.PathLike, *, storage_options: dict | None = None):
    """``index.parquet`` of a version (local or URL) as a polars DataFrame, or None when there is none."""
    data = read_bytes(join(version_dir, INDEX), storage_options)
    if data is None:
        return None
    import io

    import polars as pl

    return pl.read_parquet(io.BytesIO(data))


# ------------------------------------------------------------------------------------------------ latest
def latest_bytes(version: str) -> bytes:
    return (version + "\n").encode()


def parse_latest(data: bytes, where: str) -> str:
    """The version a ``latest`` pointer names (one line: a directory name next to it)."""
    version = data.decode("utf-8").strip()
    if not version or "/" in version or version in (".", ".."):
        raise ValueError(f"{where} names no valid version: {version!r}")
    return version


def latest_version(corpus_root: str | os.PathLike, *, storage_options: dict | None = None) -> str | None:
    """The version ``latest`` names under a corpus root, or None before the first commit."""
    where = join(corpus_root, LATEST)
    data = read_bytes(where, storage_options)
    return None if data is None else parse_latest(data, where)


def corpus_version_dir(path: str | os.PathLike, *, storage_options: dict | None = None) -> str:
    """``path`` itself when it is a version directory (it has ``manifest.json``), else the version its ``latest``
    pointer names (``path`` is a corpus root). Lets commands accept either."""
    base = location(path)
    if read_bytes(join(base, MANIFEST), storage_options) is not None:
        return base
    version = latest_version(base, storage_options=storage_options)
    if version is None:
        raise FileNotFoundError(f"{base} is neither a corpus version (no {MANIFEST}) nor a corpus root "
                                f"(no {LATEST} pointer)")
    return join(base, version)
