"""The graph stage: committed embedding parts → the kNN graph (:mod:`.stage`, Ray tasks in :mod:`.tasks`)."""
