import pytest
from PIL import Image

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
