"""Extraction: the model's hooked activations on every document, computed shard by shard into the store."""
