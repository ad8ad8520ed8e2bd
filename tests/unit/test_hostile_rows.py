"""Hostile prompt rows and images through ``ingest_prompt_file``: every bad row is dropped with its exact reason and
line number, the good rows around it are kept, and nothing escapes the inbox or blows up memory."""

import io
import json
import os
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.profiles import InputLimits, ProfileError, input_limits, load_profile
from pipelines.prompts import PromptFileError, ingest_prompt_file


def _rows_text(result):
    return [r["text"] for r in result.rows]


def _lines_by_reason(result):
    out = {}
    for rejected in result.rejected:
        out.setdefault(rejected["reason"], []).append(rejected["line"])
    return out


def _png(path: Path, size=(32, 32), color=(200, 30, 30), mode="RGB") -> str:
    Image.new(mode, size, color).save(path)
    return path.name


def _png_bytes(width: int, height: int, pixel_rows: bool = True) -> bytes:
    """An 8-bit greyscale PNG of any declared size: all-zero rows compress ~1000:1, so a 12,000 x 12,000 picture is
    a ~140 KB file; without pixel rows the IDAT is a stub (only the header is meant to be read)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    if pixel_rows:
        row = b"\0" * (width + 1)
        idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    else:
        idat = comp.compress(b"\0" * 64) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------------ rows


def test_hostile_lines_are_dropped_one_by_one_with_exact_reasons(tmp_path, monkeypatch):
    import pipelines.prompts as prompts

    real_content_id = prompts.content_id

    def exploding_content_id(*parts):  # an exception nobody foresaw, inside one row
        if "kaboom" in parts:
            raise RuntimeError("unforeseen")
        return real_content_id(*parts)

    monkeypatch.setattr(prompts, "content_id", exploding_content_id)
    deep = '{"task": "t2i", "text": "deep", "tags": ' + "[" * 100_000 + "]" * 100_000 + "}"
    lines = [
        json.dumps({"task": "t2i", "text": "a red fox"}),                         # 1 kept (after the BOM)
        deep,                                                                     # 2 json_too_deep
        "[" * 50_000,                                                             # 3 json_too_deep
        '{"task": "t2i", "text": "nan", "weight": NaN}',                          # 4 non_finite_number
        '{"task": "t2i", "text": "inf", "weight": -Infinity}',                    # 5 non_finite_number
        '{"task": "t2i", "text": "overflow", "weight": 1e999}',                   # 6 non_finite_number
        '{"task": "t2i", "text": "first", "text": "second"}',                     # 7 duplicate_key
        '{"task": "t2i", "text": "nested", "x": {"a": 1, "a": 2}}',               # 8 duplicate_key
        json.dumps({"task": "t2i", "text": "tags str", "tags": "animal"}),        # 9 bad_tags
        json.dumps({"task": "t2i", "text": "tags obj", "tags": {}}),              # 10 bad_tags
        json.dumps({"task": "t2i", "text": "tags int", "tags": 0}),               # 11 bad_tags
        json.dumps({"task": "t2i", "text": "tags num", "tags": [1]}),             # 12 bad_tags
        json.dumps({"task": "t2i", "text": "nul \u0000 byte"}),                   # 13 control_character
        json.dumps({"task": "t2i", "text": "evil \u202e txt.exe"}),               # 14 control_character
        json.dumps({"task": "t2i", "text": "isolate \u2066x\u2069"}),             # 15 control_character
        json.dumps({"task": "t2i", "text": "ok text", "tags": ["bell\u0007"]}),   # 16 control_character
        '{"task": "t2i", "text": "lone \\ud800 surrogate"}',                      # 17 invalid_unicode
        json.dumps({"task": "t2i", "text": "line\u2028separator kept"}, ensure_ascii=False),  # 18 kept, one line
        json.dumps({"task": "t2i", "text": "x", "split": "test"}),                # 19 bad_split
        json.dumps({"task": "t2i", "text": "y", "split": ["train"]}),             # 20 bad_split
        json.dumps({"task": ["t2i"], "text": "z"}),                               # 21 unknown_task
        json.dumps({"task": "t2i", "text": 5}),                                   # 22 missing_text
        json.dumps({"task": "t2i", "text": "\u200b \u2060\ufeff"}),               # 23 missing_text (invisible only)
        json.dumps({"task": "t2i", "text": "long " + "x" * 300_000}),             # 24 line_too_long
        "[1, 2]",                                                                 # 25 not_an_object
        '"just a string"',                                                        # 26 not_an_object
        '{"task": "t2i", "text": "big int", "n": 1' + "0" * 5000 + "}",           # 27 malformed_json
        json.dumps({"task": "t2i", "text": "a red  fox "}),                       # 28 duplicate_prompt (whitespace)
        json.dumps({"task": "t2i", "text": "a\tred fox", "split": "heldout"}),    # 29 split_conflict
        json.dumps({"task": "t2i", "text": unicodedata.normalize("NFD", "café au lait")}),  # 30 kept (NFC)
        json.dumps({"task": "t2i", "text": "café au lait"}, ensure_ascii=False),  # 31 duplicate_prompt (NFC)
        json.dumps({"task": "t2i", "text": "kaboom"}),                            # 32 row_error
        json.dumps({"task": "t2i", "text": "crlf ending", "tags": None}) + "\r",  # 33 kept (CRLF, null tags)
        "   ",                                                                    # 34 blank: skipped, not counted
        json.dumps({"task": "t2i", "text": "tags\u00a0normalised", "tags": ["  Animal\u3000 x "]}),  # 35 kept
        '{"task": "t2i", "text": "last good"',                                    # 36 malformed_json
    ]
    batch = tmp_path / "hostile.jsonl"
    batch.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8", "surrogatepass") + b"\n")
    result = ingest_prompt_file(batch, tmp_path / "images")

    assert _rows_text(result) == ["a red fox", "line separator kept", "café au lait", "crlf ending",
                                  "tags normalised"]
    assert result.rows[4]["tags"] == ["Animal x"]
    assert result.rows[3]["tags"] == []
    assert dict(result.drops) == {
        "json_too_deep": 2, "non_finite_number": 3, "duplicate_key": 2, "bad_tags": 4, "control_character": 4,
        "invalid_unicode": 1, "bad_split": 2, "unknown_task": 1, "missing_text": 2, "line_too_long": 1,
        "not_an_object": 2, "malformed_json": 2, "duplicate_prompt": 2, "split_conflict": 1, "row_error": 1,
    }
    assert _lines_by_reason(result) == {
        "json_too_deep": [2, 3], "non_finite_number": [4, 5, 6], "duplicate_key": [7, 8],
        "bad_tags": [9, 10, 11, 12], "control_character": [13, 14, 15, 16], "invalid_unicode": [17],
        "bad_split": [19, 20], "unknown_task": [21], "missing_text": [22, 23], "line_too_long": [24],
        "not_an_object": [25, 26], "malformed_json": [27, 36], "duplicate_prompt": [28, 31],
        "split_conflict": [29], "row_error": [32],
    }
    assert result.lines == 35  # the blank line is not a row
    assert len(result.problems) == sum(result.drops.values())
    details = {r["line"]: r["detail"] for r in result.rejected}
    assert "U+0000" in details[13] and "U+202E" in details[14]
    assert "line 1" in details[29] and "'train'" in details[29]
    assert details[32] == "RuntimeError: unforeseen"
    # every detail is safe to log: no raw control/bidi character or surrogate reaches the report
    assert all(ch.isprintable() for r in result.rejected for ch in r["detail"])
    json.dumps(result.rejected).encode("utf-8")


def test_prompt_id_is_that_of_the_normalised_text(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"task": "t2i", "text": "A red fox"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"task": "t2i", "text": "  A\u00a0red \u200bfox\n"}) + "\n")
    a = ingest_prompt_file(tmp_path / "a.jsonl", tmp_path / "o").rows[0]
    b = ingest_prompt_file(tmp_path / "b.jsonl", tmp_path / "o").rows[0]
    assert a["prompt_id"] == b["prompt_id"] and b["text"] == "A red fox"


def test_split_conflict_with_another_partition(tmp_path):
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"task": "t2i", "text": "seen  in train", "split": "heldout"},
        {"task": "t2i", "text": "seen in heldout", "split": "heldout"},
        {"task": "t2i", "text": "new", "split": "heldout"}]) + "\n")
    first = ingest_prompt_file(tmp_path / "b.jsonl", tmp_path / "o")
    known = {first.rows[0]["prompt_id"]: ("train", "partition a"), first.rows[1]["prompt_id"]: ("heldout", "partition a")}
    result = ingest_prompt_file(tmp_path / "b.jsonl", tmp_path / "o", known_splits=known)
    assert _rows_text(result) == ["seen in heldout", "new"]
    assert dict(result.drops) == {"split_conflict": 1}
    assert "partition a" in result.rejected[0]["detail"] and result.rejected[0]["line"] == 1


def test_whole_file_problems_are_prompt_file_errors(tmp_path):
    (tmp_path / "utf16.jsonl").write_bytes(json.dumps({"task": "t2i", "text": "x"}).encode("utf-16"))
    with pytest.raises(PromptFileError, match="not UTF-8 text: UTF-16"):
        ingest_prompt_file(tmp_path / "utf16.jsonl", tmp_path / "o")
    os.mkfifo(tmp_path / "fifo.jsonl")  # would block a reader forever
    with pytest.raises(PromptFileError, match="not a regular file"):
        ingest_prompt_file(tmp_path / "fifo.jsonl", tmp_path / "o")
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    (outside / "real.jsonl").write_text(json.dumps({"task": "t2i", "text": "x"}) + "\n")
    (inbox / "link.jsonl").symlink_to(outside / "real.jsonl")
    with pytest.raises(PromptFileError, match="path_outside_inbox"):
        ingest_prompt_file(inbox / "link.jsonl", tmp_path / "o", root=inbox)


# ---------------------------------------------------------------------------------------------------- images


@pytest.fixture()
def image_inbox(tmp_path):
    """inbox/batches/<batch>.jsonl naming images around it; outside/ holds a file no row may reach."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "batches").mkdir(parents=True)
    (inbox / "shared").mkdir()
    outside.mkdir()
    _png(inbox / "batches" / "ok.png")
    _png(inbox / "shared" / "style.png", color=(0, 0, 255))
    _png(outside / "secret.png", color=(1, 2, 3))
    (inbox / "batches" / "escape.png").symlink_to(outside / "secret.png")
    (inbox / "batches" / "alias.png").symlink_to(inbox / "batches" / "ok.png")
    return inbox, outside


def _edit(text, source):
    return {"task": "edit", "text": text, "source_image": source}


def test_image_paths_stay_inside_the_inbox(image_inbox, tmp_path):
    inbox, outside = image_inbox
    rows = [
        _edit("relative", "ok.png"),                                                       # 1 kept
        {"task": "multi_ref", "text": "up and into the inbox", "reference_images": ["../shared/style.png"],
         "reference_types": ["style"]},                                                    # 2 kept (inside inbox)
        _edit("dot-dot out", "../../outside/secret.png"),                                  # 3 path_outside_inbox
        _edit("absolute inside", str(inbox / "batches" / "ok.png")),                       # 4 path_outside_inbox
        _edit("absolute outside", str(outside / "secret.png")),                            # 5 path_outside_inbox
        _edit("symlink out", "escape.png"),                                                # 6 path_outside_inbox
        _edit("symlink in", "alias.png"),                                                  # 7 kept
        {"task": "multi_ref", "text": "one bad reference", "reference_images": ["ok.png", "escape.png"],
         "reference_types": ["subject", "style"]},                                         # 8 path_outside_inbox
        _edit("etc", "/etc/passwd"),                                                       # 9 path_outside_inbox
        _edit("remote", "https://example.com/x.png"),                                      # 10 bad_image
        _edit("not a string", 5),                                                          # 11 bad_image
    ]
    batch = inbox / "batches" / "b.jsonl"
    batch.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "partition_images"
    result = ingest_prompt_file(batch, out, root=inbox)
    assert _rows_text(result) == ["relative", "up and into the inbox", "symlink in"]
    assert dict(result.drops) == {"path_outside_inbox": 6, "bad_image": 2}
    assert _lines_by_reason(result)["path_outside_inbox"] == [3, 4, 5, 6, 8, 9]
    # the secret was never copied into the partition
    secret = (outside / "secret.png").read_bytes()
    assert all(p.read_bytes() != secret for p in out.iterdir())
    # the default root is the batch file's own folder: "../shared" is outside it
    alone = ingest_prompt_file(batch, tmp_path / "other", root=None)
    assert _rows_text(alone) == ["relative", "symlink in"]
    assert alone.drops["path_outside_inbox"] == 7


def test_image_budget_and_sizes(tmp_path, monkeypatch):
    from PIL import ImageFile

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "huge.png").write_bytes(_png_bytes(12_000, 12_000))                   # a few hundred KB, 144 MP
    (inbox / "bomb.png").write_bytes(_png_bytes(30_000, 30_000, pixel_rows=False))  # PIL's bomb error range
    _png(inbox / "dot.png", size=(1, 1))
    _png(inbox / "thin.png", size=(64, 8))
    _png(inbox / "edge.png", size=(16, 16))
    _png(inbox / "big.png", size=(300, 300))
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    os.mkfifo(inbox / "pipe.png")
    assert (inbox / "huge.png").stat().st_size < 400_000
    loaded = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    rows = [
        _edit("huge", "huge.png"),                                                         # 1 image_too_large
        _edit("bomb", "bomb.png"),                                                         # 2 image_too_large
        _edit("one pixel", "dot.png"),                                                     # 3 image_too_small
        {"task": "multi_ref", "text": "thin ref", "reference_images": ["thin.png"],
         "reference_types": ["pose"]},                                                     # 4 image_too_small
        _edit("just big enough", "edge.png"),                                              # 5 kept
        _edit("over the configured budget", "big.png"),                                    # 6 image_too_large
        _edit("broken", "broken.png"),                                                     # 7 bad_image
        _edit("fifo", "pipe.png"),                                                         # 8 bad_image
        _edit("missing", "nope.png"),                                                      # 9 missing_image
    ]
    batch = inbox / "b.jsonl"
    batch.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    limits = InputLimits(max_pixels=250 * 250)
    result = ingest_prompt_file(batch, tmp_path / "out", root=inbox, limits=limits)
    assert _rows_text(result) == ["just big enough"]
    assert dict(result.drops) == {"image_too_large": 3, "image_too_small": 2, "bad_image": 2, "missing_image": 1}
    assert _lines_by_reason(result) == {"image_too_large": [1, 2, 6], "image_too_small": [3, 4],
                                        "bad_image": [7, 8], "missing_image": [9]}
    assert not [size for size in loaded if size[0] * size[1] > limits.max_pixels]  # refused from the header
    details = {r["line"]: r["detail"] for r in result.rejected}
    assert "12000x12000 = 144000000 pixels > 62500 (inputs.max_pixels)" in details[1]
    assert "1x1" in details[3] and "64x8" in details[4]
    # a byte budget too
    tight = ingest_prompt_file(batch, tmp_path / "out2", root=inbox, limits=InputLimits(max_image_bytes=50))
    assert _lines_by_reason(tight) == {"image_too_large": [1, 2, 3, 4, 5, 6],  # every image of more than 50 bytes
                                       "bad_image": [7, 8], "missing_image": [9]}  # broken.png has 22


def test_default_limits_refuse_the_12k_png(tmp_path):
    (tmp_path / "huge.png").write_bytes(_png_bytes(12_000, 12_000))
    (tmp_path / "b.jsonl").write_text(json.dumps(_edit("huge", "huge.png")) + "\n"
                                      + json.dumps({"task": "t2i", "text": "fine"}) + "\n")
    result = ingest_prompt_file(tmp_path / "b.jsonl", tmp_path / "out")
    assert _rows_text(result) == ["fine"] and dict(result.drops) == {"image_too_large": 1}
    assert "> 16777216 (inputs.max_pixels)" in result.rejected[0]["detail"]


def _stored(result, i) -> Image.Image:
    path = result.rows[i]["source_image"]
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img.copy()


def test_modes_are_converted_faithfully_and_stored_so(tmp_path):
    gradient = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(gradient).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode == "I;16" and np.asarray(check.convert("RGB")).mean() > 250  # PIL alone: all white
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))
    rgba.save(tmp_path / "alpha.png")  # left half opaque blue, right half transparent "red"
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 16, 32))
    pal.save(tmp_path / "pal.png", transparency=0)  # left green, right transparent black
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK, no ICC profile
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "plain.png")
    rows = [_edit(f"mode {name}", name) for name in ("deep.png", "alpha.png", "pal.png", "cmyk.jpg", "plain.png")]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = ingest_prompt_file(tmp_path / "b.jsonl", tmp_path / "out")
    assert len(result.rows) == 5 and not result.drops
    deep = np.asarray(_stored(result, 0))[..., 0].astype(int)
    expected = np.rint(gradient.astype(float) / 257).astype(int)
    assert np.abs(deep - expected).max() <= 1 and deep.min() == 0 and deep.max() == 255
    alpha = _stored(result, 1)
    assert alpha.getpixel((4, 4)) == (0, 0, 255) and alpha.getpixel((28, 4)) == (255, 255, 255)
    pal_img = _stored(result, 2)
    assert pal_img.getpixel((4, 4)) == (0, 255, 0) and pal_img.getpixel((28, 4)) == (255, 255, 255)
    red = _stored(result, 3).getpixel((16, 16))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    # converted images are stored as their faithful PNG; the plain ones keep their original bytes
    assert result.rows[0]["source_image"].endswith(".png") and result.rows[3]["source_image"].endswith(".jpg")
    assert Path(result.rows[4]["source_image"]).read_bytes() == (tmp_path / "plain.png").read_bytes()
    # the prompt_id still hashes the original bytes: the same file elsewhere is the same prompt
    again = ingest_prompt_file(tmp_path / "b.jsonl", tmp_path / "out_again")
    assert [r["prompt_id"] for r in again.rows] == [r["prompt_id"] for r in result.rows]


def test_decode_image_modes():
    from pipelines.io import decode_image

    def encoded(img, fmt="PNG", **kw):
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    ints = Image.fromarray(np.full((8, 8), 40000, dtype=np.int32), mode="I")
    assert decode_image(encoded(ints, "TIFF")).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257
    small_ints = Image.fromarray(np.full((8, 8), 100, dtype=np.int32), mode="I")
    decoded = decode_image(encoded(small_ints, "TIFF"))
    assert decoded.getpixel((0, 0)) == (100, 100, 100) and "converted" not in decoded.info
    floats = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F")
    assert decode_image(encoded(floats, "TIFF")).getpixel((0, 0)) == (128, 128, 128)
    # EXIF orientation 6 (rotate 90° clockwise to display): a 20x10 stored picture shows as 10x20
    stored = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode_image(encoded(stored, "JPEG", exif=exif.tobytes()))
    assert upright.size == (10, 20) and "EXIF" in upright.info["converted"]
    with pytest.raises(ValueError, match="image too large"):
        decode_image(_png_bytes(300, 300), max_pixels=1000)
    with pytest.raises(ValueError, match="image too large"):
        decode_image(_png_bytes(30_000, 30_000, pixel_rows=False))
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(b"\x89PNG\r\n\x1a\ngarbage")


# ---------------------------------------------------------------------------------------------------- limits


def test_input_limits_in_the_profile(tmp_path):
    assert input_limits(load_profile("tiny")) == InputLimits()
    assert input_limits(load_profile("sdxl_vllm")).max_pixels == 16_777_216
    assert input_limits({}) == InputLimits()  # a profile without the section: the defaults
    tiny = Path(load_profile.__code__.co_filename).parent / "tiny.yaml"
    base = tiny.read_text().split("\ninputs:")[0]
    ok = tmp_path / "custom.yaml"
    ok.write_text(base + "\ninputs:\n  max_pixels: 1000\n")
    limits = input_limits(load_profile(str(ok)))
    assert limits.max_pixels == 1000 and limits.min_image_side == InputLimits().min_image_side
    no_section = tmp_path / "old.yaml"
    no_section.write_text(base + "\n")
    assert input_limits(load_profile(str(no_section))) == InputLimits()
    for bad, message in (("  max_pixel: 5\n", "unknown keys"), ("  max_pixels: -1\n", "positive integer"),
                         ("  max_pixels: lots\n", "positive integer")):
        path = tmp_path / f"bad{len(message)}{len(bad)}.yaml"
        path.write_text(base + "\ninputs:\n" + bad)
        with pytest.raises(ProfileError, match=message):
            load_profile(str(path))
