"""The prompt inbox: a local directory or any fsspec URL (``s3://bucket/inbox``) of ``*.jsonl`` batch files, one
``prompt_batches`` partition per file (the key is the sanitised file stem; a stem with no ASCII letter or digit gets
``batch-<first 8 hex of the sha256 of its NFC name>``, so any name has a deterministic key).

Files that cannot become a partition are *reported*, never raised: two files whose names sanitise to one key
(both skipped, so neither silently wins), a symlink whose target lies outside the inbox (``path_outside_inbox``),
something that is not a regular file (a FIFO would block a reader forever), and files that are not a batch at all
(not UTF-8, no line that is a JSON object). Row-level problems (an unknown task, a missing image) are not the
inbox's business: the ``prompt_batches`` asset drops those rows and counts them by reason.

The same containment rule holds for every inbox: a local one is checked after following symlinks; a remote one
(no symlinks there) by its normalised path, and only images inside it are ever staged.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pipelines.prompts import MAX_BATCH_BYTES, InputLimits  # noqa: F401 - MAX_BATCH_BYTES re-exported


@dataclass(frozen=True)
class InboxFile:
    key: str  # the partition key
    url: str  # where the file is (a local path or a URL)
    fingerprint: str  # changes when the file does (size + modification time or the store's checksum)
    root: str = ""  # the inbox it was listed in (a local path, or the store's path for a remote inbox)
    rel: str = ""  # its path below ``root``, "/"-separated


def shown(text: object) -> str:
    """Text safe for a log line or metadata: non-printable characters (newlines, bidi controls, the surrogates
    that stand for undecodable bytes in a file name) escaped."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def partition_key(stem: str) -> str:
    """The partition key of a batch file's stem: ``safe_key`` of it, or ``batch-<sha8>`` when that leaves nothing
    (a name of only non-ASCII characters or punctuation)."""
    from pipelines.paths import safe_key

    try:
        return safe_key(stem)
    except ValueError:
        name = unicodedata.normalize("NFC", stem).encode("utf-8", "surrogateescape")
        return f"batch-{hashlib.sha256(name).hexdigest()[:8]}"


def _fs(inbox: str):
    import fsspec

    return fsspec.core.url_to_fs(str(inbox))


def _fingerprint(info: dict) -> str:
    for field in ("ETag", "etag", "md5", "checksum"):
        if info.get(field):
            return str(info[field]).strip('"')
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('created')}"


def _is_local(fs) -> bool:
    return "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol))


def list_inbox(inbox: str) -> tuple[dict[str, InboxFile], list[str]]:
    """Every batch file under ``inbox`` (hidden directories skipped) by partition key, and the problems found
    (key collisions, symlinks out of the inbox, entries that are not regular files). A missing inbox is empty."""
    fs, root = _fs(inbox)
    if not fs.exists(root):
        return {}, []
    local = _is_local(fs)
    root_real = os.path.realpath(root) if local else None
    by_key: dict[str, list[InboxFile]] = {}
    problems: list[str] = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = posixpath.relpath(path, root)
        if not path.endswith(".jsonl") or any(part.startswith(".") for part in rel.split("/")):
            continue
        url = path if local else fs.unstrip_protocol(path)
        if local:
            real = os.path.realpath(path)
            if os.path.commonpath([real, root_real]) != root_real:
                problems.append(f"{shown(url)}: path_outside_inbox: a symlink to {shown(real)}, outside the inbox "
                                f"{shown(root_real)}; not a batch file here")
                continue
            try:
                st = os.stat(real)
            except OSError as exc:
                problems.append(f"{shown(url)}: cannot be read: {shown(exc)}")
                continue
            if not os.path.isfile(real):
                problems.append(f"{shown(url)}: not a regular file")
                continue
            info = {"size": st.st_size, "mtime": st.st_mtime}
        elif info.get("type", "file") != "file":
            problems.append(f"{shown(url)}: not a regular file")
            continue
        key = partition_key(posixpath.basename(path)[: -len(".jsonl")])
        by_key.setdefault(key, []).append(InboxFile(key, url, _fingerprint(info), root, rel))
    files = {}
    for key, found in by_key.items():
        if len(found) > 1:
            problems.append(f"{len(found)} inbox files map to partition {key!r}: "
                            f"{', '.join(shown(f.url) for f in found)}; rename all but one")
        else:
            files[key] = found[0]
    return files, problems


def default_limits() -> InputLimits:
    """The ``inputs`` limits of the profile in ``PREFMILL_PROFILE`` (the defaults when it cannot be loaded)."""
    try:
        from pipelines.profiles import input_limits, load_profile

        return input_limits(load_profile())
    except Exception:  # noqa: BLE001 - a broken profile is the assets' to report; the inbox check goes on
        return InputLimits()


def batch_file_problem(data: bytes, limits: InputLimits | None = None) -> str | None:
    """Why ``data`` is not a batch file at all, or None. Only whole-file problems: a file with one usable line
    is a batch (its other lines are the asset's to drop). Never raises."""
    from pipelines.prompts import PromptFileError, RowRefused, decode_batch, parse_line, split_lines

    if len(data) > MAX_BATCH_BYTES:
        return f"{len(data)} bytes, more than the {MAX_BATCH_BYTES} a batch file may have; split it"
    try:
        text = decode_batch(data)
    except PromptFileError as exc:
        return str(exc)
    limits = limits or default_limits()
    first_error = None
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            parse_line(line, limits)
            return None
        except RowRefused as exc:
            first_error = first_error or f"line {number}: {exc.detail}"
        except Exception as exc:  # noqa: BLE001 - whatever one line does, the verdict is about the file
            first_error = first_error or f"line {number}: {type(exc).__name__}"
    return f"no line is a JSON object ({first_error})" if first_error else "empty file"


def read_batch(file: InboxFile) -> bytes:
    import fsspec

    with fsspec.open(file.url, "rb") as handle:
        return handle.read(MAX_BATCH_BYTES + 1)


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ingested_sha256(instance, key: str) -> str | None:
    """The ``source_sha256`` the latest ``prompt_batches`` materialization of partition ``key`` recorded (the
    content it ingested); None when it was never materialized or (materialized before this was recorded) has
    none."""
    import dagster as dg

    from pipelines.partitions import PROMPT_BATCH_PARTITIONS

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(PROMPT_BATCH_PARTITIONS), asset_partitions=[key]), limit=1)
    for record in records.records:
        materialization = record.asset_materialization
        value = materialization.metadata.get("source_sha256") if materialization else None
        return str(value.value) if value is not None else None
    return None


def stage_batch(file: InboxFile, staging: Path, limits: InputLimits | None = None) -> tuple[Path, Path]:
    """A local path to ingest ``file`` from and the root its images must lie in: the file itself and the inbox
    when the inbox is local; else a fresh copy in ``staging`` (same layout below the inbox root) together with the
    images its rows name by relative path, and ``staging``. An image path that leaves the inbox (absolute, ``..``
    past its root, a URL) is never fetched, so ingestion refuses it exactly as for a local inbox."""
    import fsspec

    from pipelines.prompts import decode_batch, parse_line, split_lines

    if "://" not in file.url or file.url.startswith("file://"):
        local_path = Path(file.url.removeprefix("file://"))
        return local_path, Path(file.root.removeprefix("file://")) if file.root else local_path.parent
    limits = limits or InputLimits()
    fs, path = fsspec.core.url_to_fs(file.url)
    rel = file.rel or posixpath.basename(path)
    root = file.root or posixpath.dirname(path)
    shutil.rmtree(staging, ignore_errors=True)  # nothing of an earlier version of the batch may linger
    staging.mkdir(parents=True)
    local = staging / rel
    local.parent.mkdir(parents=True, exist_ok=True)
    with fs.open(path, "rb") as handle:
        data = handle.read(MAX_BATCH_BYTES + 1)
    local.write_bytes(data)
    try:
        text = decode_batch(data)
    except ValueError:
        return local, staging  # ingestion reports why
    batch_dir = posixpath.dirname(rel)
    for line in split_lines(text):
        try:
            row = parse_line(line, limits)
        except Exception:  # noqa: BLE001 - ingestion counts it
            continue
        refs = [row.get("source_image")]
        if isinstance(row.get("reference_images"), list):
            refs += row["reference_images"]
        for ref in refs:
            if not isinstance(ref, str) or not ref.strip() or "://" in ref or ref.startswith("/") or "\x00" in ref:
                continue
            image_rel = posixpath.normpath(posixpath.join(batch_dir, ref))
            if image_rel == ".." or image_rel.startswith("../") or image_rel.startswith("/"):
                continue  # outside the inbox: ingestion refuses it (path_outside_inbox)
            target = staging / image_rel
            if target.exists():
                continue
            remote = posixpath.join(root, image_rel)
            try:
                info = fs.info(remote)
                if info.get("type", "file") != "file" or (info.get("size") or 0) > limits.max_image_bytes:
                    continue  # ingestion reports it missing rather than this copying a huge object
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.part")
                fs.get_file(remote, str(tmp))
                tmp.replace(target)
            except Exception:  # noqa: BLE001 - not there / not readable: ingestion reports it missing
                continue
    return local, staging
