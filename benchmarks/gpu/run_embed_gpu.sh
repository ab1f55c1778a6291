#!/usr/bin/env bash
# The embed stage's GPU throughput, in one go, on a fresh GPU machine with this repo checked out:
#
#   bash benchmarks/gpu/run_embed_gpu.sh
#
# Creates a venv (.venv-gpu; system site-packages visible, so a machine's preinstalled CUDA torch
# is used when it has the pinned version), installs the package (pip install -e .; on a machine
# without network set WHEELS=/path/to/wheels holding the pinned wheels, CUDA torch included), then runs benchmarks/embed_throughput.py
# --device cuda for ViT-B-32 and ViT-L-14 (random weights: speed only), each with device decode on
# and off against the bare forward loop, and writes benchmarks/results/embed_gpu.json and .md.
# Budget: under 8 minutes with the packages at hand (about 2 for the install, 2.5 per model:
# each model's pool is sized for STEADY_S seconds of the bare loop's speed, and every step has a
# timeout). The benchmark's own --help says what each column means.
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv-gpu}
STEADY_S=${STEADY_S:-15}
MODEL_TIMEOUT_S=${MODEL_TIMEOUT_S:-200}
RESULTS=benchmarks/results

started=$(date +%s)
if ! command -v "$PYTHON" >/dev/null; then
    echo "$PYTHON not found: the package needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
pip_args=(--quiet --disable-pip-version-check)
if [ -n "${WHEELS:-}" ]; then
    pip_args+=(--no-index --find-links "$WHEELS")
fi
timeout 300 "$VENV/bin/python" -m pip install "${pip_args[@]}" -e .
"$VENV/bin/python" - <<'PY'
import torch
assert torch.cuda.is_available(), "torch sees no GPU: install a CUDA build of the pinned torch"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "install: $(( $(date +%s) - started )) s"

mkdir -p "$RESULTS"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One model per process, each under its own timeout: a slow model cannot eat the other's budget,
# and what finished is kept.
for model in ViT-B-32 ViT-L-14; do
    echo "== $model"
    if PYTHONUNBUFFERED=1 timeout "$MODEL_TIMEOUT_S" "$VENV/bin/python" -W ignore::DeprecationWarning \
        benchmarks/embed_throughput.py --device cuda --models "$model" --decode both \
        --steady-seconds "$STEADY_S" --json "$tmp/$model.json"; then
        :
    else
        echo "$model: benchmark failed or ran past ${MODEL_TIMEOUT_S} s" >&2
    fi
done

"$VENV/bin/python" - "$tmp" "$RESULTS" <<'PY'
import glob, json, os, sys

sys.path.insert(0, ".")
from benchmarks.embed_throughput import markdown

tmp, results = sys.argv[1:]
parts = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(tmp, "*.json")))]
if not parts:
    sys.exit("no model finished: nothing to write")
merged = {**parts[0], "rows": [r for p in parts for r in p["rows"]],
          "argv": ["--device", "cuda", "--models", ",".join(p["rows"][0]["model"] for p in parts), "--decode", "both"]}
# the issue's targets, with device decode: ViT-L-14 >= 0.85 of the bare loop, ViT-B-32 >= 0.70
targets = {"ViT-L-14": 0.85, "ViT-B-32": 0.70}
merged["targets"] = {m: {"target": t, "ratio": r["ratio"], "met": r["ratio"] >= t}
                     for r in merged["rows"] if r["device_decode"] for m, t in targets.items() if r["model"] == m}
with open(os.path.join(results, "embed_gpu.json"), "w") as fh:
    json.dump(merged, fh, indent=2)
    fh.write("\n")
text = markdown(merged) + "\nTargets (device decode): " + ", ".join(
    f"{m} {v['ratio']:.3f} (target {v['target']}, {'met' if v['met'] else 'NOT met'})"
    for m, v in merged["targets"].items()) + "\n"
with open(os.path.join(results, "embed_gpu.md"), "w") as fh:
    fh.write(text)
print(text)
PY
echo "total: $(( $(date +%s) - started )) s"
