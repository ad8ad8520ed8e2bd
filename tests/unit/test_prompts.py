import json

import pytest
from PIL import Image

from pipelines.prompts import PromptFileError, ingest_prompt_file


def _png(path, color=(200, 30, 30)):
    Image.new("RGB", (16, 16), color).save(path)
    return path.name


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_good_rows_kept_bad_rows_counted_by_reason(tmp_path):
    src = _png(tmp_path / "src.png")
    ref = _png(tmp_path / "ref.png", (0, 0, 255))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    batch = _write(tmp_path / "b.jsonl", [
        {"task": "t2i", "text": "a red fox"},
        {"task": "edit", "text": "make it blue", "source_image": src},
        {"task": "multi_ref", "text": "the subject on a beach", "reference_images": [ref], "reference_types": ["subject"]},
        '{"task": "t2i", "text": ',                                     # malformed JSON
        {"task": "video", "text": "x"},                                 # unknown task
        {"task": "t2i", "text": "   "},                                 # empty text
        {"task": "edit", "text": "no source"},                          # edit without source
        {"task": "edit", "text": "missing", "source_image": "nope.png"},
        {"task": "edit", "text": "broken", "source_image": "broken.png"},
        {"task": "multi_ref", "text": "types", "reference_images": [ref], "reference_types": []},
        {"task": "t2i", "text": "a red fox"},                           # duplicate of line 1
    ])
    result = ingest_prompt_file(batch, tmp_path / "out")
    assert [r["task"] for r in result.rows] == ["t2i", "edit", "multi_ref"]
    assert dict(result.drops) == {
        "malformed_json": 1, "unknown_task": 1, "missing_text": 1, "missing_source_image": 1,
        "missing_image": 1, "bad_image": 1, "bad_references": 1, "duplicate_prompt": 1,
    }
    assert any(p.startswith("line 4: malformed_json") for p in result.problems)
    edit = result.rows[1]
    assert edit["source_image"].startswith(str(tmp_path / "out"))  # copied into the partition by content hash
    assert len({r["prompt_id"] for r in result.rows}) == 3


def test_prompt_id_is_a_content_hash(tmp_path):
    _write(tmp_path / "a.jsonl", [{"task": "t2i", "text": "same"}])
    _write(tmp_path / "b.jsonl", [{"task": "t2i", "text": "same", "tags": ["x"]}])
    a = ingest_prompt_file(tmp_path / "a.jsonl", tmp_path / "o").rows[0]["prompt_id"]
    b = ingest_prompt_file(tmp_path / "b.jsonl", tmp_path / "o").rows[0]["prompt_id"]
    assert a == b and len(a) == 32


def test_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        ingest_prompt_file(tmp_path / "missing.jsonl", tmp_path)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        ingest_prompt_file(tmp_path / "bin.jsonl", tmp_path)


def test_inbox_sanitises_keys_and_reports_collisions(tmp_path):
    from pipelines.inbox import list_inbox

    _write(tmp_path / "batch one.jsonl", [{"task": "t2i", "text": "x"}])
    (tmp_path / ".hidden").mkdir()
    _write(tmp_path / ".hidden" / "skip.jsonl", [])
    files, problems = list_inbox(str(tmp_path))
    assert list(files) == ["batch-one"] and problems == []
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "batch-one.jsonl", [])
    files, problems = list_inbox(str(tmp_path))
    assert files == {} and len(problems) == 1 and "map to partition 'batch-one'" in problems[0]


def test_batch_file_problems():
    from pipelines.inbox import batch_file_problem

    assert batch_file_problem(b'{"task": "t2i", "text": "x"}\nnot json\n') is None  # rows are the asset's
    assert "not UTF-8" in batch_file_problem(b"\xff\xfe\x00garbage")
    assert batch_file_problem(b"") == "empty file"
    assert "line 1: Expecting value" in batch_file_problem(b"nope\n[1, 2]\n")
    assert "line 1: not a JSON object" in batch_file_problem(b"[1, 2]\n")
