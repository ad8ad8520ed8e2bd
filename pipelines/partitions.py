"""Work is partitioned by prompt batch: one dynamic partition per batch file in the inbox (never per image)."""

import dagster as dg

PROMPT_BATCH_PARTITIONS = "prompt_batches"
prompt_batch_partitions = dg.DynamicPartitionsDefinition(name=PROMPT_BATCH_PARTITIONS)
