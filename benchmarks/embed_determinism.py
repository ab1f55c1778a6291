"""Do the embed stage's bits depend on embed.batch_size or the CPU thread count?

    .venv/bin/python benchmarks/embed_determinism.py [--quick] [--json benchmarks/results/embed_determinism.json]

The same 32 pictures go through the model (pipeline.embed.model.ClipEncoder, CPU, fp32, random
weights: the tiny architecture and ViT-B-32, nothing downloaded) in batches of 1, 2, 3, 5, 7 and 32
with 1 and 2 torch threads; the table counts the rows whose clip_score differs in any bit from
batch 32 with 1 thread. Any non-zero count means the setting must be part of the stage's
fingerprint (a resume with another value would mix parts that a fresh run would not produce).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCHES = (1, 2, 3, 5, 7, 32)
THREADS = (1, 2)


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--json", default=None, help="write the results here (and a .md next to it)")
    args = parser.parse_args(argv)

    import numpy as np

    from pipeline.embed.model import ClipEncoder, ModelSpec, preprocess_config, tokenize, worker_preprocessors
    from pipeline.storage import Store
    from pipeline.testing import TINY_MODEL_CONFIG, TINY_MODEL_NAME, render_image

    models = [(TINY_MODEL_NAME, json.dumps(TINY_MODEL_CONFIG, sort_keys=True))]
    if not args.quick:
        models.append(("ViT-B-32", None))
    rows = []
    for name, config_json in models:
        spec = ModelSpec(name, None, config_json, 0)
        pp_json = json.dumps(preprocess_config(spec), sort_keys=True)
        images, tokenizer, _ = worker_preprocessors(spec, pp_json)
        rng = np.random.default_rng(0)
        pixels, captions = [], []
        for _ in range(32):
            image, caption = render_image(rng, 64)
            pixels.append(images(image))
            captions.append(caption)
        pixels, tokens = np.stack(pixels), tokenize(tokenizer, captions)
        scores = {}
        for threads in THREADS:
            encoder = ClipEncoder(spec, Store(), pp_json, torch_threads=threads)
            for batch in BATCHES:
                parts = [encoder.encode(pixels[i:i + batch], tokens[i:i + batch])[2] for i in range(0, 32, batch)]
                scores[threads, batch] = np.concatenate(parts).astype(np.float32)
        reference = scores[1, 32].view(np.uint32)
        for (threads, batch), score in scores.items():
            rows.append({"model": name, "threads": threads, "batch": batch,
                         "rows_differing": int((score.view(np.uint32) != reference).sum()), "rows": 32})
    results = {"machine": f"{os.cpu_count()}-core {cpu()}, Python {platform.python_version()}", "rows": rows}
    lines = ["# embed_determinism: clip_score bits against batch 32 with 1 thread", "",
             f"Machine: {results['machine']}. Command: `benchmarks/embed_determinism.py"
             f"{' --quick' if args.quick else ''}`.", "",
             "| model | threads | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
             "|---|---|" + "---|" * len(BATCHES)]
    for name, _ in models:
        for threads in THREADS:
            cells = [next(r for r in rows if (r["model"], r["threads"], r["batch"]) == (name, threads, b))
                     for b in BATCHES]
            lines.append(f"| {name} | {threads} | " + " | ".join(f"{c['rows_differing']}/32" for c in cells) + " |")
    lines += ["", "Every non-zero count is a setting that changes bits: a shard's last chunk has 1 to batch-1 rows, "
              "so embed.batch_size changes the embeddings of some rows, and with 2 threads so does the thread count "
              "(for small batches). Both are part of the embed stage's fingerprint (pipeline/embed/stage.py)."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        Path(args.json).with_suffix(".md").write_text(table)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
