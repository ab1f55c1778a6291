"""The demo's image–text pool: WebDataset shards plus a ground-truth table kept out of them.

Layout under the pool directory::

    shards/00000.tar ...       jpg + txt + json ({"uid": ...}) per sample: all the pipeline sees
    ground_truth.parquet       one row per uid: what is really in the picture and what was planted
    pool.json                  seed, sizes, counts and the shard pattern

Planted on purpose (and recorded in ground_truth.parquet):

* **mismatched captions** (``mismatch_rate``, ~10%): the caption of another picture of another
  kind (shape or colour differ), as scraped alt-text so often is;
* **near-duplicate groups**: one picture plus 1–3 copies, re-encoded at a low JPEG quality,
  shifted a few pixels or slightly recoloured, all with the same caption;
* **rare kinds**: a rare shape (heart) and a rare colour (cyan), each in ~1% of the pictures,
  which a coreset should still cover.

Mismatches, duplicates and rare kinds are planted on disjoint samples, so each figure of the
evaluation measures one thing. Generation is a pure function of the seed: the same seed gives the
same bytes (tar members carry a fixed mtime).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from ..formats.tar import TarWriter
from . import scenes

POOL_SEED = 20240507
FULL_SIZE = 3000
QUICK_SIZE = 1000
SAMPLES_PER_SHARD = 500


@dataclass(frozen=True)
class PoolSpec:
    n_samples: int = FULL_SIZE
    seed: int = POOL_SEED
    samples_per_shard: int = SAMPLES_PER_SHARD
    mismatch_rate: float = 0.10
    duplicate_group_rate: float = 0.04  # groups per sample of the pool; each group has 2–4 members
    rare_shape_rate: float = 0.01
    rare_colour_rate: float = 0.01

    def __post_init__(self):
        if self.n_samples < 100:
            raise ValueError(f"n_samples={self.n_samples}: the demo pool needs at least 100 samples")
        if self.samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard={self.samples_per_shard} must be positive")
        for name in ("mismatch_rate", "duplicate_group_rate", "rare_shape_rate", "rare_colour_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.5:
                raise ValueError(f"{name}={value} must be in [0, 0.5)")


def quick_spec(seed: int = POOL_SEED) -> PoolSpec:
    return PoolSpec(n_samples=QUICK_SIZE, seed=seed)


def make_uid(seed: int, index: int) -> str:
    """DataComp-like uid: 32 lowercase hex chars, a function of the pool seed and sample index."""
    return hashlib.md5(f"d2prune-demo/{seed}/{index}".encode()).hexdigest()


def _common_scene(rng: np.random.Generator) -> scenes.Scene:
    return scenes.sample_scene(
        rng,
        shape_probs={s: 1.0 for s in scenes.COMMON_SHAPES},
        colour_probs={c: 1.0 for c in scenes.COMMON_COLOURS},
    )


def _rare_scene(rng: np.random.Generator, rare: str) -> scenes.Scene:
    if rare in scenes.RARE_SHAPES:
        return scenes.sample_scene(rng, shape_probs={rare: 1.0},
                                   colour_probs={c: 1.0 for c in scenes.COMMON_COLOURS})
    return scenes.sample_scene(rng, shape_probs={s: 1.0 for s in scenes.COMMON_SHAPES},
                               colour_probs={rare: 1.0})


def plan_pool(spec: PoolSpec) -> list[dict]:
    """Decide every sample (scene, caption, planted role) without rendering; in final pool order."""
    rng = np.random.default_rng(spec.seed)
    n = spec.n_samples
    n_groups = round(spec.duplicate_group_rate * n)
    group_sizes = rng.integers(2, 5, size=n_groups)  # 2..4 members: the original plus 1..3 copies
    n_copies = int((group_sizes - 1).sum())
    n_originals = n - n_copies
    n_rare_shape = max(1, round(spec.rare_shape_rate * n)) if spec.rare_shape_rate > 0 else 0
    n_rare_colour = max(1, round(spec.rare_colour_rate * n)) if spec.rare_colour_rate > 0 else 0
    n_common = n_originals - n_rare_shape - n_rare_colour
    n_mismatch = round(spec.mismatch_rate * n)
    if n_common < n_groups + n_mismatch + 1:
        raise ValueError(f"pool of {n} samples is too small for {n_groups} duplicate groups and {n_mismatch} mismatches")

    originals: list[dict] = []
    for _ in range(n_common):
        originals.append({"scene": _common_scene(rng), "rare": ""})
    for _ in range(n_rare_shape):
        originals.append({"scene": _rare_scene(rng, scenes.RARE_SHAPES[0]), "rare": "shape"})
    for _ in range(n_rare_colour):
        originals.append({"scene": _rare_scene(rng, scenes.RARE_COLOURS[0]), "rare": "colour"})
    for orig, item in enumerate(originals):
        item.update(orig=orig, caption=scenes.caption(item["scene"]), true_caption=scenes.caption(item["scene"]),
                    mismatched=False, caption_from=-1, dup_group=-1, dup_variant="")

    # Roles go to disjoint sets of common originals: duplicate-group originals, then mismatches.
    common_ids = rng.permutation(n_common)
    group_originals = common_ids[:n_groups]
    mismatch_ids = common_ids[n_groups:n_groups + n_mismatch]
    for g, idx in enumerate(group_originals):
        originals[idx].update(dup_group=g, dup_variant="original")
    for idx in mismatch_ids:
        own = originals[idx]["scene"]
        while True:  # a caption of another common picture, of another kind
            donor = int(common_ids[rng.integers(n_common)])
            if originals[donor]["scene"].kind != own.kind:
                break
        originals[idx].update(caption=originals[donor]["true_caption"], mismatched=True, caption_from=int(donor))

    samples = list(originals)
    for g, idx in enumerate(group_originals):
        variants = rng.choice(len(scenes.DUPLICATE_VARIANTS), size=int(group_sizes[g]) - 1, replace=False)
        for v in sorted(variants):
            copy = dict(originals[idx])
            copy.update(dup_variant=scenes.DUPLICATE_VARIANTS[v], variant_seed=int(rng.integers(2**31)))
            samples.append(copy)
    order = rng.permutation(len(samples))  # copies land in other shards than their original, as on the web
    return [samples[i] for i in order]


def generate_pool(out_dir: str, spec: PoolSpec | None = None) -> dict:
    """Write the pool's shards, ground truth and manifest under `out_dir` (a local directory).

    Returns the manifest (also written to ``pool.json``), including ``shards``, the brace pattern
    to put in the job's ``input.shards``. Re-running with the same spec rewrites identical files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = spec or PoolSpec()
    plan = plan_pool(spec)
    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    n_shards = (len(plan) + spec.samples_per_shard - 1) // spec.samples_per_shard
    rows: dict[str, list] = {name: [] for name in (
        "uid", "shard", "key", "shape", "colour", "size", "texture", "position", "background", "kind",
        "rare", "caption", "true_caption", "mismatched", "caption_from_uid", "dup_group", "dup_variant",
        "jpeg_quality")}
    uids = [make_uid(spec.seed, i) for i in range(len(plan))]
    # caption_from indexes originals; the donor's uid is that of its original (not of a copy)
    uid_of_original = {item["orig"]: uids[i] for i, item in enumerate(plan)
                       if item["dup_variant"] in ("", "original")}

    for shard in range(n_shards):
        name = f"{shard:05d}.tar"
        tmp = os.path.join(shard_dir, f".{name}.tmp")
        with TarWriter(tmp) as tar:
            for i in range(shard * spec.samples_per_shard, min(len(plan), (shard + 1) * spec.samples_per_shard)):
                item = plan[i]
                scene: scenes.Scene = item["scene"]
                picture = scenes.render(scene)
                quality = 90
                if item["dup_variant"] and item["dup_variant"] != "original":
                    variant_rng = np.random.default_rng(item["variant_seed"])
                    picture, quality = scenes.near_duplicate(picture, item["dup_variant"], variant_rng)
                key = f"{shard:05d}{i % spec.samples_per_shard:04d}"
                tar.add(f"{key}.jpg", scenes.encode_jpeg(picture, quality))
                tar.add(f"{key}.txt", item["caption"].encode())
                tar.add(f"{key}.json", json.dumps({"uid": uids[i]}).encode())
                rows["uid"].append(uids[i])
                rows["shard"].append(name)
                rows["key"].append(key)
                for attr in ("shape", "colour", "size", "texture", "position", "background", "kind"):
                    rows[attr].append(getattr(scene, attr))
                rows["rare"].append(item["rare"])
                rows["caption"].append(item["caption"])
                rows["true_caption"].append(item["true_caption"])
                rows["mismatched"].append(item["mismatched"])
                rows["caption_from_uid"].append(uid_of_original[item["caption_from"]] if item["mismatched"] else "")
                rows["dup_group"].append(item["dup_group"])
                rows["dup_variant"].append(item["dup_variant"])
                rows["jpeg_quality"].append(quality)
        os.replace(tmp, os.path.join(shard_dir, name))

    table = pa.table(rows)
    tmp = os.path.join(out_dir, ".ground_truth.parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, os.path.join(out_dir, "ground_truth.parquet"))
    manifest = {
        "seed": spec.seed,
        "spec": spec.__dict__,
        "samples": len(plan),
        "shards": os.path.join(os.path.abspath(shard_dir), "{00000..%05d}.tar" % (n_shards - 1)),
        "n_shards": n_shards,
        "planted": {
            "mismatched": int(sum(r["mismatched"] for r in plan)),
            "duplicate_groups": int(len({r["dup_group"] for r in plan if r["dup_group"] >= 0})),
            "duplicate_members": int(sum(r["dup_group"] >= 0 for r in plan)),
            "rare_shape": int(sum(r["rare"] == "shape" for r in plan)),
            "rare_colour": int(sum(r["rare"] == "colour" for r in plan)),
        },
        "ground_truth": os.path.abspath(os.path.join(out_dir, "ground_truth.parquet")),
    }
    with open(os.path.join(out_dir, "pool.json"), "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the d2prune demo pool (WebDataset shards + ground truth).")
    parser.add_argument("out_dir")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE} samples instead of {FULL_SIZE}")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=POOL_SEED)
    args = parser.parse_args(argv)
    n = args.samples or (QUICK_SIZE if args.quick else FULL_SIZE)
    manifest = generate_pool(args.out_dir, PoolSpec(n_samples=n, seed=args.seed))
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
