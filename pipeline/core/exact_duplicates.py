"""Exact duplicates by content digest, as a pure function of one hash bucket's rows: which rows
repeat an earlier row's digest, and which row they repeat. Pure numpy.

A digest is the 32 bytes of a sha256 (of an image member's bytes), held as four uint64 words so
that rows sort and compare as numbers. "Earlier" is node order: node = the embedding parts'
concatenated row order, which is (shard, position in the shard) for the embed stage and (metadata
file, row) for the precomputed path. So the kept sample of a group is the same whichever bucket,
task or machine looks at it.
"""

from __future__ import annotations

import numpy as np

HEX_DIGITS = 64  # a sha256 as lowercase or uppercase hex


def digest_words(hex_digests) -> tuple[np.ndarray, np.ndarray]:
    """(words [n, 4] uint64 big-endian, valid [n] bool) of hex sha256 strings (None or anything but
    64 hex digits: not valid, words 0)."""
    n = len(hex_digests)
    words = np.zeros((n, 4), np.uint64)
    valid = np.zeros(n, bool)
    raw = bytearray(32 * n)
    for i, text in enumerate(hex_digests):
        if text is None or len(text) != HEX_DIGITS:
            continue
        try:
            raw[32 * i: 32 * i + 32] = bytes.fromhex(text)
        except ValueError:
            continue
        valid[i] = True
    if n:
        words[:] = np.frombuffer(bytes(raw), ">u8").reshape(n, 4)
    return words, valid


def first_of_groups(words: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate rows, the row each repeats): for every group of rows with equal ``words`` (the
    four digest words), each row but the one of the smallest node, paired with that row. Rows
    are positions into the inputs; both outputs are ordered by the duplicate's node."""
    words = np.asarray(words, np.uint64).reshape(-1, 4)
    nodes = np.asarray(nodes, np.int64)
    if len(nodes) != len(words):
        raise ValueError(f"{len(words)} digests for {len(nodes)} nodes")
    if len(nodes) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # by digest, then node: each group's first row is its earliest node
    order = np.lexsort((nodes, words[:, 3], words[:, 2], words[:, 1], words[:, 0]))
    w = words[order]
    starts = np.concatenate(([True], np.any(w[1:] != w[:-1], axis=1)))
    group_first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    dup = ~starts
    rows, kept = order[dup], group_first[dup]
    by_node = np.argsort(nodes[rows], kind="stable")
    return rows[by_node].astype(np.int64), kept[by_node].astype(np.int64)


__all__ = ["HEX_DIGITS", "digest_words", "first_of_groups"]
