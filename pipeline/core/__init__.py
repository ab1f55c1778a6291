"""Pure cores: numpy (+ numba, FAISS) in, numpy out. No Ray, no fsspec, no pyarrow, no storage.

* :mod:`.d2`: D2 Pruning on a kNN graph (docs/d2.md sections 1-5, 9): graph, forward pass, exact greedy.
* :mod:`.selectors`: the baselines (random, score top-k, CCS, moderate, k-center) and budgets.
* :mod:`.knn`: the kNN graph maths (vectors, IVF training, list-major search, recall).
* :mod:`.d2_exact`: the exact partitioned greedy (docs/d2.md#10-the-exact-partitioned-greedy): one partition's state and round step.
* :mod:`.partition`: partitions of the graph built from IVF cells, a partition's rows from edge records.
* :mod:`.coreset`: the select stage's distributed pieces: rankings, the rank search, random keys.
* :mod:`.runs`: ordered items cut into consecutive runs under a weight bound (every stage's tasks).
* :mod:`.uids`: the one uid hash (shuffle buckets, the uid registry, the write stage's hash sum).

Everything here is unit-tested without Ray or storage; the stages (``pipeline.embed``,
``pipeline.graph``, ``pipeline.select``, ``pipeline.write``) wrap it with I/O and Ray.
"""
