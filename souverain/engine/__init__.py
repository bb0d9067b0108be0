"""Generation. `simple` is the batch-1 loop; the batched engine builds on the same model API."""
