"""The select stage: the committed graph and scores → selected.parquet + subset.npy (:mod:`.stage`)."""
