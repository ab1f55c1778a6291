"""d2prune: distributed D2 Pruning for image-text pools."""
