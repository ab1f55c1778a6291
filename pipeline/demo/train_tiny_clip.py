"""Train the demo's tiny CLIP: an open_clip model small enough to ship, trained on CPU in minutes.

The model (``assets/tiny_clip.json``: a 2-layer ViT on 48-pixel images, a 2-layer text transformer,
64-d embeddings) is trained with the CLIP contrastive loss on pairs drawn by
:mod:`pipeline.demo.scenes` with a seed (:data:`TRAIN_SEED`) other than the demo pool's, and with
every shape and colour equally likely: like a web-scale CLIP it knows every word; it is the demo
*pool* that is skewed. Pictures go through the same path as at embedding time (JPEG bytes →
open_clip's own preprocessing), so the scores it gives the pool mean what they meant in training.

The checkpoint is a plain ``state_dict`` (floats stored as float16 to stay small) that open_clip's
``create_model(..., pretrained=<path>)`` loads like any user checkpoint: the demo uses it through
the same code path as a real model.

    nice -n 5 python -m pipeline.demo.train_tiny_clip            # writes assets/tiny_clip.pt
    python -m pipeline.demo.train_tiny_clip --eval-only          # re-measures the shipped one

It prints, on held-out pairs (a third seed), how often a picture's own caption scores above the
caption of a picture of another kind, and image→text top-1 retrieval among 100 candidates.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time

import numpy as np

from . import scenes

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
MODEL_NAME = "tiny_clip"
CONFIG_PATH = os.path.join(ASSETS, f"{MODEL_NAME}.json")
CHECKPOINT_PATH = os.path.join(ASSETS, f"{MODEL_NAME}.pt")
TRAIN_SEED = 7  # training pairs; the demo pool uses pool.POOL_SEED, the held-out check HELDOUT_SEED
HELDOUT_SEED = 99
# held-out pictures that all have the rare shape or the rare colour (half and half in expectation)
RARE_ONLY = {"shape_probs": {**{s: 0.5 / len(scenes.COMMON_SHAPES) for s in scenes.COMMON_SHAPES},
                             **{s: 0.5 / len(scenes.RARE_SHAPES) for s in scenes.RARE_SHAPES}}}


def load_model(checkpoint: str | None = CHECKPOINT_PATH):
    """The tiny CLIP through open_clip's public API: register the config, create, load weights."""
    import open_clip

    open_clip.add_model_config(CONFIG_PATH)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=checkpoint)
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)


def make_pairs(n: int, seed: int, preprocess, shape_probs: dict[str, float] | None = scenes.POOL_SHAPE_PROBS,
               colour_probs: dict[str, float] | None = scenes.POOL_COLOUR_PROBS) -> tuple["torch.Tensor", list[scenes.Scene]]:
    """`n` pictures (as the model's input tensors, float16) and their scenes; kinds as often as in
    the demo pool unless other probabilities are given."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = torch.empty((n, 3, *_input_size(preprocess)), dtype=torch.float16)
    drawn = []
    for i in range(n):
        scene = scenes.sample_scene(rng, shape_probs, colour_probs)
        jpeg = scenes.encode_jpeg(scenes.render(scene), quality=int(rng.integers(40, 96)))
        images[i] = preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB")).to(torch.float16)
        drawn.append(scene)
    return images, drawn


def _input_size(preprocess) -> tuple[int, int]:
    from PIL import Image

    probe = preprocess(Image.new("RGB", (scenes.CANVAS, scenes.CANVAS)))
    return tuple(probe.shape[-2:])


def _captions(batch: list[scenes.Scene], rng: np.random.Generator) -> list[str]:
    # a fresh wording each time a pair is seen, so the text tower learns the words, not the templates
    return [scenes.caption(s.__class__(**{**s.as_dict(), "template": int(rng.integers(len(scenes.CAPTION_TEMPLATES)))}))
            for s in batch]


def evaluate(model, tokenizer, images, drawn: list[scenes.Scene], seed: int = 0) -> dict[str, float]:
    """Matched-vs-mismatched accuracy, its ROC AUC, and image→text top-1 among 100 candidates."""
    import torch

    rng = np.random.default_rng(seed)
    model.eval()
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images.float()), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer([scenes.caption(s) for s in drawn])), dim=-1)
    matched = (img * txt).sum(-1).numpy()
    n = len(drawn)
    other = np.empty(n, dtype=np.int64)
    for i in range(n):  # a caption of a picture of another kind, as the pool's planted mismatches
        while True:
            j = int(rng.integers(n))
            if drawn[j].kind != drawn[i].kind:
                other[i] = j
                break
    mismatched = (img * txt[other]).sum(-1).numpy()
    order = np.argsort(np.concatenate([mismatched, matched]), kind="stable")
    ranks = np.empty(2 * n)
    ranks[order] = np.arange(1, 2 * n + 1)
    auc = (ranks[n:].sum() - n * (n + 1) / 2) / (n * n)
    top1 = []
    for start in range(0, n - 99, 100):
        sims = img[start:start + 100] @ txt[start:start + 100].T
        top1.append((sims.argmax(1).numpy() == np.arange(100)).mean())
    return {
        "pair_accuracy": float((matched > mismatched).mean()),
        "auc": float(auc),
        "retrieval_top1_of_100": float(np.mean(top1)),
        "matched_score_mean": float(matched.mean()),
        "mismatched_score_mean": float(mismatched.mean()),
    }


def train_contrastive(model, images, batch_tokens, steps: int, batch_size: int, lr: float, seed: int,
                      log=print, log_every: int = 50) -> None:
    """Train `model` in place with the CLIP contrastive loss: `steps` batches of `batch_size` pairs
    drawn at random (without replacement within a batch) from `images` (model input tensors, as a
    torch tensor or numpy array; float16 is fine), AdamW with weight decay on matrices only,
    linear warm-up then cosine decay, the temperature clamped at 100 as in CLIP. `batch_tokens(idx, rng)` gives the batch's caption
    tokens (a fixed caption per pair, or a fresh wording each time)."""
    import open_clip
    import torch

    n_pairs = len(images)
    loss_fn = open_clip.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    rng = np.random.default_rng(seed + 1)
    model.train()
    t1 = time.time()
    for step in range(steps):
        idx = rng.choice(n_pairs, size=min(batch_size, n_pairs), replace=False)
        texts = batch_tokens(idx, rng)
        batch = images[idx]  # a torch tensor, or a numpy array (a memory-mapped one in benchmark workers)
        img_f, txt_f, scale = model(torch.as_tensor(batch).float(), texts)[:3]
        loss = loss_fn(img_f, txt_f, scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"contrastive training diverged: loss {float(loss)} at step {step} (seed {seed})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # as in CLIP: the temperature is clamped at 100
            model.logit_scale.clamp_(0, math.log(100))
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss.item():.3f}  logit_scale {model.logit_scale.exp().item():.1f}  "
                f"{time.time() - t1:.0f}s")
    model.eval()


def train(steps: int, batch_size: int, n_pairs: int, lr: float, seed: int = TRAIN_SEED,
          checkpoint: str = CHECKPOINT_PATH) -> dict:
    import torch

    torch.manual_seed(seed)
    model, preprocess, tokenizer = load_model(checkpoint=None)
    t0 = time.time()
    images, drawn = make_pairs(n_pairs, seed, preprocess)
    held_images, held_drawn = make_pairs(2000, HELDOUT_SEED, preprocess)
    rare_images, rare_drawn = make_pairs(400, HELDOUT_SEED + 1, preprocess, **RARE_ONLY)
    data_s = time.time() - t0
    print(f"generated {n_pairs} training and 2000 held-out pairs in {data_s:.0f}s", flush=True)
    t1 = time.time()
    train_contrastive(model, images, lambda idx, rng: tokenizer(_captions([drawn[i] for i in idx], rng)),
                      steps, batch_size, lr, seed, log=lambda msg: print(msg, flush=True))
    train_s = time.time() - t1
    metrics = evaluate(model, tokenizer, held_images, held_drawn)
    rare_metrics = evaluate(model, tokenizer, rare_images, rare_drawn)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, checkpoint)
    record = {
        "seed": seed, "heldout_seed": HELDOUT_SEED, "steps": steps, "batch_size": batch_size,
        "n_pairs": n_pairs, "lr": lr, "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
        "torch_threads": torch.get_num_threads(), "heldout": metrics, "heldout_rare_kinds": rare_metrics,
        "checkpoint_bytes": os.path.getsize(checkpoint),
    }
    with open(os.path.splitext(checkpoint)[0] + ".train.json", "w") as fh:
        json.dump(record, fh, indent=2)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train (or re-check) the demo's tiny open_clip model on CPU.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=TRAIN_SEED)
    parser.add_argument("--checkpoint", default=CHECKPOINT_PATH,
                        help="where to write the weights (and NAME.train.json beside them)")
    parser.add_argument("--eval-only", action="store_true", help="measure the shipped checkpoint on held-out pairs")
    args = parser.parse_args(argv)
    if args.eval_only:
        model, preprocess, tokenizer = load_model(args.checkpoint)
        images, drawn = make_pairs(2000, HELDOUT_SEED, preprocess)
        print("held-out pairs:", json.dumps(evaluate(model, tokenizer, images, drawn), indent=2))
        images, drawn = make_pairs(400, HELDOUT_SEED + 1, preprocess, **RARE_ONLY)
        print("held-out pairs with the rare shape:", json.dumps(evaluate(model, tokenizer, images, drawn), indent=2))
        return
    record = train(args.steps, args.batch_size, args.pairs, args.lr, args.seed, args.checkpoint)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
