"""Atomic file writes and WebDataset shard I/O (DESIGN.md: write to a temporary sibling, fsync, rename): the one
set of helpers the pipelines, labelers and trainers write through.

- Files: :func:`atomic_path` (yields the temp to write; fsync + rename on success), and on it
  :func:`atomic_write_text`, :func:`write_json`, :func:`write_parquet`; directories: :func:`atomic_dir` (build in a
  temp sibling) and :func:`replace_dir` (swap a finished directory in, the old one moved aside first).
- Shards: :func:`shard_writer` is the one WebDataset tar writer (the corpus writer, :mod:`pipelines.corpora`, and
  :func:`write_shard` for candidate shards); :func:`read_shard` reads one back.

Temporary siblings name their owner: ``.<final name>.tmp-<pid>@<host>.<random>.tmp``. A process killed
mid-write (SIGKILL, the OOM killer, a preempted node) leaves its temp behind; :func:`remove_stale_temps`, which
every stage calls on its own folders when it starts, removes the ones whose owner is gone and never a live
process's.

Dagster-free and light at import (the standard library only; webdataset and PIL inside functions), so labelers
and trainers import it without loading the Dagster code location.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ temp owners
def this_host() -> str:
    """This machine's name as it appears in temp names and run tags (letters, digits and ``-`` only)."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-") or "localhost"


def temp_owner() -> str:
    """``<pid>@<host>``: who writes a temporary file, for :func:`remove_stale_temps`."""
    return f"{os.getpid()}@{this_host()}"


def temp_prefix(final_name: str) -> str:
    """The ``mkstemp`` prefix of a temporary sibling of ``final_name``: ``.<final name>.tmp-<pid>@<host>.``"""
    return f".{final_name}.tmp-{temp_owner()}."


# `.x.tmp-<pid>@<host>.<random>.tmp` (this module), `.x.tmp-<pid>` / `.x.old-<pid>` (trainers, pid only)
_TEMP_OWNER = re.compile(r"\.(?:tmp|old)-(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?(?:\.|$)")
# a temp without an owner: `.x.<random>.tmp` (mkstemp before owners were named), `.x.tmp`
_TEMP_PLAIN = re.compile(r"^\..+\.tmp$")
# a temp on another machine (shared volume) is removed only once it has not changed for this long
OTHER_HOST_STALE_S = 3600.0
_PID_SLACK_S = 5.0  # /proc start times: whole clock ticks, boot time whole seconds; small wall-clock steps


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def process_started_at(pid: int) -> float | None:
    """When process ``pid`` of this host started (epoch seconds), from ``/proc``; None where unknown."""
    try:
        with open(f"/proc/{int(pid)}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    boot = _boot_time()
    if boot is None or len(fields) < 20:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not). With ``since`` (epoch seconds: a moment the
    process being asked about was known to run, e.g. the time of an event it wrote), a process that started
    after ``since`` is another one that reused the pid, and does not count."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        with open(f"/proc/{int(pid)}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X", "x"):
            return False
    except (OSError, IndexError):
        pass
    if since is not None:
        started = process_started_at(pid)
        if started is not None and started > since + _PID_SLACK_S:
            return False
    return True


def _newest_mtime(path: Path) -> float:
    """The latest modification time in ``path`` (a directory: anything beneath it)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for base, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(base, name)).st_mtime)
    return newest


def stale_temp_reason(path: Path, started_at: float, host: str | None = None) -> str | None:
    """Why the temporary file or directory ``path`` is stale (a reason to remove it), or None to keep it:

    - it names its owner ``<pid>@<host>`` on this host: stale iff that process is gone (or the pid now belongs
      to a process that started after the temp was last written);
    - it names only a pid (trainer temps): the same, and it must also not have changed since ``started_at``;
    - it names another host (a shared volume): stale once unchanged for ``OTHER_HOST_STALE_S``;
    - it names no owner: stale iff unchanged since ``started_at`` (the calling stage's start).

    The caller's own temps (its pid on this host) are never stale."""
    host = host or this_host()
    name = path.name
    if not name.startswith("."):
        return None
    try:
        mtime = _newest_mtime(path)
    except FileNotFoundError:
        return None
    match = _TEMP_OWNER.search(name)
    if match:
        pid, owner_host = int(match["pid"]), match["host"]
        if owner_host is not None and owner_host != host:
            age = time.time() - mtime
            return f"owner on host {owner_host}, unchanged for {age:.0f} s" if age > OTHER_HOST_STALE_S else None
        if pid == os.getpid():
            return None
        if owner_host is None and mtime >= started_at:
            return None
        if process_alive(pid, since=mtime):
            return None
        return f"owner process {pid} is gone"
    if _TEMP_PLAIN.match(name) and mtime < started_at:
        return "no owner, older than this stage's start"
    return None


def remove_stale_temps(directory: str | os.PathLike, started_at: float | None = None,
                       log=None) -> list[Path]:
    """Remove the temporary siblings (files or directories, see :func:`stale_temp_reason`) that killed writers
    left in ``directory`` (not recursive). A stage calls it on its own folders when it starts, with its start
    time; two live processes never remove each other's temps. Returns what was removed."""
    directory = Path(directory)
    started_at = time.time() if started_at is None else started_at
    removed = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for path in sorted(entries):
        reason = stale_temp_reason(path, started_at)
        if reason is None:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
        if log is not None:
            log(f"removed stale temp {path} ({reason})")
    return removed


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success fsync it and rename it over ``final``; on error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(final.name), suffix=".tmp", dir=final.parent)
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


def atomic_write_text(final: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``final`` atomically."""
    with atomic_path(Path(final)) as tmp:
        tmp.write_text(text)
    return Path(final)


def write_parquet(df, final: Path) -> Path:
    """Write a polars DataFrame atomically."""
    with atomic_path(final) as tmp:
        df.write_parquet(tmp)
    return final


def write_json(obj: Any, final: Path) -> Path:
    return atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place (readers never see half of it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """fsync every file under the finished directory ``tmp`` and rename it to ``final``; an existing ``final`` is
    first moved aside (``.<name>.old-<pid>@<host>``, a temp :func:`remove_stale_temps` knows) and deleted after,
    so ``final`` is always either the old or the new directory."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = final.with_name(f".{final.name}.old-{temp_owner()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def encode_image(image, fmt: str = "png", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, max_pixels: int | None = None):
    """Decode image bytes to 8-bit RGB; raises ``ValueError`` with the reason when they are not a readable image.

    ``max_pixels``: refuse (``ValueError`` starting "image too large") an image whose header declares more pixels,
    before anything is decoded; PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, left as it is) is
    reported the same way. The conversion is faithful for every mode, not just PIL's ``convert("RGB")``: 16-bit and
    32-bit greyscale (``I;16*``, ``I``) and float (``F``) are scaled to 8 bit instead of clipped (which turns a
    16-bit picture almost white); transparency (``RGBA``, ``LA``, ``PA``, a palette's transparent index) is
    composited over white instead of dropped; CMYK goes through its embedded ICC profile when it has one; the EXIF
    orientation is applied. When the result differs from ``convert("RGB")`` of the bytes, ``image.info["converted"]``
    says how (so a caller that keeps the original file knows to keep this decoding instead).
    """
    import warnings

    from PIL import Image, ImageOps

    def scaled_to_8bit(img, mode):
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16"):
            low, high = 0.0, 65535.0
        else:  # "I" (32-bit int) or "F": by its value range
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            if not np.isfinite([lo, hi]).all():
                arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
                lo, hi = float(arr.min()), float(arr.max())
            if lo >= 0 and hi <= (1.0 if mode == "F" else 255.0):
                low, high = 0.0, (1.0 if mode == "F" else 255.0)
            elif lo >= 0 and hi <= 65535:
                low, high = 0.0, 65535.0
            else:
                low, high = lo, (hi if hi > lo else lo + 1.0)
        out = np.clip(np.rint((arr - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
        return Image.fromarray(out, mode="L").convert("RGB")

    def to_rgb(img):
        notes = []
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - unreadable EXIF: no orientation to apply
            orientation = 1
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
            notes.append(f"EXIF orientation {orientation} applied")
        mode = img.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            if not (mode == "I" and img.getextrema()[1] <= 255 and img.getextrema()[0] >= 0):
                notes.append(f"{mode} scaled to 8 bit")
            rgb = scaled_to_8bit(img, mode)
        elif mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            alpha = rgba.getchannel("A")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba.convert("RGB"), mask=alpha)
            if alpha.getextrema()[0] < 255:
                notes.append(f"{mode} transparency composited over white")
        elif mode == "CMYK" and img.info.get("icc_profile"):
            try:
                from PIL import ImageCms

                source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
                rgb = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
                notes.append("CMYK converted to sRGB through its ICC profile")
            except Exception:  # noqa: BLE001 - a broken profile: PIL's plain conversion
                rgb = img.convert("RGB")
        else:
            rgb = img.convert("RGB")
        if notes:
            rgb.info["converted"] = "; ".join(notes)
        return rgb

    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # our own budget applies; PIL's warning below its error limit is noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    too_large = f"image too large: {width}x{height} = {width * height} pixels > {max_pixels}"
                else:
                    too_large = None
                    img.load()
                    return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a malformed file makes PIL raise nearly anything
        raise ValueError(f"undecodable image: {type(exc).__name__}: {exc}") from exc
    raise ValueError(too_large)


SHARD_MTIME = 0  # fixed member times: the same samples give byte-identical shards (and sha256)


def shard_writer(handle):
    """The WebDataset shard writer: webdataset's ``TarWriter`` over a plain binary file, in tarfile's block mode
    (``"w"``; TarWriter picks the pipe mode ``"w|"`` for file objects, whose buffer re-slicing copies every large
    member several times) with USTAR headers (TarWriter does not pass its ``format`` on, and tarfile's PAX default
    costs an extra header block per member), members copied in one piece, fixed member times. Same tar layout
    webdataset reads. Each sample is a dict with ``__key__`` and extension -> bytes/str/dict (webdataset's
    encoders apply)."""
    import tarfile

    import webdataset as wds

    class ShardWriter(wds.TarWriter):
        @staticmethod
        def tarmode(fileobj, compress=None):
            return "w"

    writer = ShardWriter(handle, mtime=SHARD_MTIME)
    writer.tarstream.format = tarfile.USTAR_FORMAT
    writer.tarstream.copybufsize = 1 << 24  # copy a member in one piece, not in 16 KiB slices
    return writer


def write_shard(final: Path, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write one WebDataset tar atomically with :func:`shard_writer`; returns its sha256, count and bytes."""
    count = 0
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as handle, shard_writer(handle) as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
        digest, size = file_sha256(tmp), tmp.stat().st_size
    return {"shard": final.name, "sha256": digest, "count": count, "bytes": size}


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
