"""The select stage: the committed graph and scores → selected.parquet, subset*.npy and per-node
results, computed by partition workers (:mod:`.stage`, :mod:`.driver`)."""
