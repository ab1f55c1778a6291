"""The write stage: the selection → new WebDataset shards with the original bytes (:mod:`.stage`)."""
