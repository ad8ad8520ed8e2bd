import json

import dagster as dg
import pytest
from PIL import Image

from assets.prompts import prompt_batches
from pipelines.partitions import PROMPT_BATCH_PARTITIONS
from pipelines.resources import default_resources


def _materialize(tmp_path, key):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, [key])
    return dg.materialize([prompt_batches], partition_key=key, instance=instance, raise_on_error=False,
                          resources=default_resources(str(tmp_path / "data")))


def test_bad_rows_are_counted_and_good_rows_kept(tmp_path):
    inbox = tmp_path / "data" / "inbox"
    inbox.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(inbox / "a.png")  # inputs.min_image_side: 16
    rows = [{"task": "t2i", "text": "ok"}, {"task": "edit", "text": "e", "source_image": "a.png"},
            {"task": "edit", "text": "gone", "source_image": "missing.png"}]
    (inbox / "mixed.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{broken\n")
    result = _materialize(tmp_path, "mixed")
    assert result.success
    meta = result.asset_materializations_for_node("prompt_batches")[0].metadata
    assert meta["num_prompts"].value == 2 and meta["dropped"].value == 2
    assert "missing_image" in meta["drops_by_reason"].value and "malformed_json" in meta["drops_by_reason"].value
    rejects = json.loads((tmp_path / "data" / "prompt_batches" / "mixed" / "rejects.json").read_text())
    assert rejects["drops"] == {"missing_image": 1, "malformed_json": 1}


def test_batch_with_no_usable_row_fails_with_reason(tmp_path):
    inbox = tmp_path / "data" / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "junk.jsonl").write_text("not json\n")
    result = _materialize(tmp_path, "junk")
    assert not result.success
    failure = result.failure_data_for_node("prompt_batches").error
    assert "no usable prompt rows" in failure.message


@pytest.mark.parametrize("key", ["absent"])
def test_partition_without_file_names_the_inbox(tmp_path, key):
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    result = _materialize(tmp_path, key)
    assert not result.success
    assert "no batch file absent.jsonl" in result.failure_data_for_node("prompt_batches").error.message
