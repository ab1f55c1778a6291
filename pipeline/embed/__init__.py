"""The embed stage: input shards → one committed parquet part of embeddings per shard (:mod:`.stage`)."""
