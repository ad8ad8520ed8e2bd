"""Atomic file writes and WebDataset shard I/O (DESIGN.md: write to a temporary sibling, fsync, rename)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success fsync it and rename it over ``final``; on error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(df, final: Path) -> Path:
    """Write a polars DataFrame atomically."""
    with atomic_path(final) as tmp:
        df.write_parquet(tmp)
    return final


def write_json(obj: Any, final: Path) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return final


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place (readers never see half of it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def encode_image(image, fmt: str = "png", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes):
    """Decode image bytes to RGB; raises ``ValueError`` with the reason when they are not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"undecodable image: {exc}") from exc


def write_shard(final: Path, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write one WebDataset tar atomically with ``webdataset.TarWriter``; returns its sha256, count and bytes.

    Each sample is a dict with ``__key__`` and extension -> bytes/str/dict (webdataset's encoders apply).
    """
    import hashlib

    import webdataset as wds

    count = 0
    with atomic_path(final) as tmp:
        with wds.TarWriter(str(tmp)) as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
        digest = hashlib.sha256()
        with open(tmp, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        size = tmp.stat().st_size
    return {"shard": final.name, "sha256": digest.hexdigest(), "count": count, "bytes": size}


def read_shard(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the raw samples (``__key__`` plus extension -> bytes) of one tar, with webdataset's tar reader."""
    import webdataset as wds

    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    yield from dataset


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
