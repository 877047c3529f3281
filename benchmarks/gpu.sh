#!/usr/bin/env bash
# GPU checks for lenet-tune, on one machine with an NVIDIA GPU (about 3-5 minutes):
#   1. images/s of one trial's loop on the GPU (data held on the device, float32, NCHW:
#      trainables/loop.py) at batch 128 and 512, beside a plain float32 GPU loop on the
#      same data, and with bf16 autocast / channels-last turned on to show what each would buy;
#   2. how many trials pack on one GPU: a FIFO sweep of $TRIALS one-worker trials with
#      --gpus-per-worker $GPU_SHARE, timed per trial from MLflow;
#   3. GPU utilisation and memory during that sweep (nvidia-smi every second, in the background).
#
#   bash benchmarks/gpu.sh                              # results in ./gpu-results
#   OUT=/tmp/gpu GPU_SHARE=0.125 TRIALS=16 bash benchmarks/gpu.sh
#   DATA=imagefolder:/data/cifar bash benchmarks/gpu.sh  # default: /tmp/cifar if present, else synthetic
#
# Installs nothing but the project itself (pip install -e .), and only if it is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-results}"
PYTHON="${PYTHON:-python3}"
GPU_SHARE="${GPU_SHARE:-0.25}"   # GPUs per trial: 0.25 packs four trials on a card
TRIALS="${TRIALS:-8}"            # trials in the packing sweep: two rounds at 0.25
EPOCHS="${EPOCHS:-3}"            # epochs per trial in the packing sweep
SYNTHETIC_IMAGES="${SYNTHETIC_IMAGES:-50000}"  # CIFAR-10's size, when no real images are at hand
if [[ -z "${DATA:-}" ]]; then
  if [[ -d /tmp/cifar/train ]]; then DATA="imagefolder:/tmp/cifar"; else DATA="synthetic"; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: MLflow's sqlite URI and Ray's storage path need it
export OUT DATA GPU_SHARE TRIALS EPOCHS SYNTHETIC_IMAGES

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this script needs an NVIDIA GPU" >&2; exit 2; }
if ! "$PYTHON" -c "import trainables, jobs" 2>/dev/null; then
  "$PYTHON" -m pip install -q -e .
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')"
nvidia-smi > "$OUT/nvidia-smi.txt"
echo "data: $DATA; results: $OUT"

# ---------------------------------------------------------------- 1. one trial's loop on the GPU
"$PYTHON" - <<'EOF'
import contextlib, json, os, time

import torch
import torch.nn.functional as F

from trainables.config import DataConfig, HyperParams
from trainables.data import load_splits
from trainables.loop import as_device_tensors, build_optimizer, train_epoch
from trainables.model import LeNet

source = os.environ["DATA"]
splits = load_splits(DataConfig(source=source, synthetic_train_images=int(os.environ["SYNTHETIC_IMAGES"])))
device = torch.device("cuda")
# As `fit` holds them on CUDA: the whole uint8 training set on the device (NCHW); batches cut there.
images, labels = as_device_tensors(splits.train_images, splits.train_labels, device)
TIMED_EPOCHS = 2


def images_per_second(run_epoch, batch_size: int) -> float:
    run_epoch(1)  # warm-up: cuDNN plans, the caching allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    for epoch in range(2, 2 + TIMED_EPOCHS):
        run_epoch(epoch)
    torch.cuda.synchronize()
    return TIMED_EPOCHS * (len(labels) // batch_size) * batch_size / (time.perf_counter() - start)


def product(batch_size: int, augment: str, bf16: bool = False, channels_last: bool = False) -> float:
    """trainables.loop.train_epoch on the data as fit() holds it (float32, NCHW); the what-ifs turn on
    bf16 autocast or channels-last memory, which the product leaves off because they measured slower."""
    hp = HyperParams(batch_size=batch_size, augment=augment, epochs=1 + TIMED_EPOCHS)
    torch.manual_seed(hp.seed)
    model = LeNet(hp.dilation, hp.padding).to(device)
    x = images
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = images.contiguous(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, hp)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with precision:
        return images_per_second(lambda e: train_epoch(model, optimizer, x, labels, hp, e, batch_size), batch_size)


def plain(batch_size: int) -> float:
    """The baseline: the plain loop a person writes first on a GPU (float32, NCHW, torch.optim.SGD,
    normalised per batch, no augmentation), from the same device-resident data."""
    torch.manual_seed(0)
    model = LeNet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_all = images
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=device).view(1, 3, 1, 1) * 255

    def run_epoch(epoch: int) -> None:
        order = torch.randperm(len(labels), device=device)
        for i in range(len(labels) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model((x_all[idx].float() - mean) / std), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return images_per_second(run_epoch, batch_size)


results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "train_images": len(labels),
           "data": source}
for batch_size in (128, 512):
    b = f"batch{batch_size}"
    results[f"{b}_plain_fp32_images_per_second"] = plain(batch_size)
    results[f"{b}_none_images_per_second"] = product(batch_size, "none")
    results[f"{b}_flip_images_per_second"] = product(batch_size, "flip")
    results[f"{b}_none_bf16_images_per_second"] = product(batch_size, "none", bf16=True)
    results[f"{b}_none_channels_last_images_per_second"] = product(batch_size, "none", channels_last=True)
    results[f"{b}_none_bf16_channels_last_images_per_second"] = product(batch_size, "none", bf16=True,
                                                                        channels_last=True)
    results[f"{b}_product_vs_plain"] = (results[f"{b}_none_images_per_second"]
                                        / results[f"{b}_plain_fp32_images_per_second"])
results["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(results, indent=2))
with open(os.path.join(os.environ["OUT"], "single_trial.json"), "w") as f:
    json.dump(results, f, indent=2)
EOF

# ---------------------------------------------------------------- 2 and 3. packing sweep, with nvidia-smi
cat > "$OUT/sweep.yaml" <<EOF
sweep: {name: gpu-pack-$(date +%H%M%S), num_samples: $TRIALS, epochs: $EPOCHS, scheduler: fifo}
# One fixed configuration (batch 128, flip), so packed trials compare with step 1's single trial.
space: {lr: [0.05, 0.05], dilations: [1], paddings: [0], batch_sizes: [128], momentums: [0.9], augments: [flip]}
resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: $GPU_SHARE}
data: {source: "$DATA", synthetic_train_images: $SYNTHETIC_IMAGES}
tracking: {tracking_uri: "sqlite:///$OUT/mlflow.db", storage_path: "$OUT/results", experiment: gpu-bench}
EOF
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,nounits -l 1 > "$OUT/gpu-utilisation.csv" &
SMI_PID=$!
(while sleep 1; do
   echo "$(date +%s) $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | grep -c .)"
 done) > "$OUT/gpu-processes.txt" &
APPS_PID=$!
trap 'kill "$SMI_PID" "$APPS_PID" 2>/dev/null || true' EXIT
SWEEP_START=$(date +%s)
set +e  # `python -m jobs.cli` is `lenet-tune`, whether or not the venv's bin/ is on PATH
"$PYTHON" -m jobs.cli tune --config "$OUT/sweep.yaml" 2>&1 | tee "$OUT/sweep.log" | grep -E "^\[|best|test"
status=${PIPESTATUS[0]}
set -e
SWEEP_END=$(date +%s)
if [[ $status -ne 0 ]]; then
  tail -n 30 "$OUT/sweep.log" >&2
  echo "the sweep failed (exit $status): see $OUT/sweep.log" >&2
  exit 1
fi
kill "$SMI_PID" "$APPS_PID" 2>/dev/null || true
export SWEEP_START SWEEP_END

"$PYTHON" - <<'EOF'
import csv, json, os
from datetime import datetime

import mlflow

out = os.environ["OUT"]
start, end = int(os.environ["SWEEP_START"]), int(os.environ["SWEEP_END"])
client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
experiment = client.get_experiment_by_name("gpu-bench")
runs = client.search_runs([experiment.experiment_id], "tags.trial_id != ''", max_results=1000)
runs = [r for r in runs if r.info.start_time >= start * 1000]  # this sweep's trials only
spans = [(r.info.start_time / 1000, (r.info.end_time or r.info.start_time) / 1000) for r in runs]
events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
running = packed = 0
for _, step in events:
    running += step
    packed = max(packed, running)
per_trial = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "images_per_second")]
startup = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "startup_seconds")]
train_images = int(runs[0].data.params.get("train_images", 0)) if runs else 0
epochs = sum(len(client.get_metric_history(r.info.run_id, "val_acc")) for r in runs)
first, last = min(s for s, _ in spans), max(e for _, e in spans)

utilisation, memory = [], []
with open(os.path.join(out, "gpu-utilisation.csv")) as f:
    for row in list(csv.reader(f, skipinitialspace=True))[1:]:  # timestamp, utilisation %, memory MiB
        try:
            stamp = datetime.strptime(row[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            busy, used = float(row[1]), float(row[2])
        except (ValueError, IndexError):  # a half-written last line, or "[N/A]"
            continue
        if first <= stamp <= last:  # while trials ran
            utilisation.append(busy)
            memory.append(used)
with open(os.path.join(out, "gpu-processes.txt")) as f:
    processes = max((int(line.split()[1]) for line in f if len(line.split()) == 2), default=0)
single = json.load(open(os.path.join(out, "single_trial.json")))
summary = {
    "gpus_per_worker": float(os.environ["GPU_SHARE"]), "trials": len(runs),
    "trials_at_once_mlflow": packed, "processes_on_gpu_at_once": processes,
    "per_trial_images_per_second_packed": sum(per_trial) / max(len(per_trial), 1),
    "single_trial_images_per_second_batch128": single["batch128_flip_images_per_second"],
    "aggregate_images_per_second": epochs * train_images / (last - first) if last > first else None,
    "startup_seconds_mean": sum(startup) / max(len(startup), 1),
    "gpu_utilisation_mean_pct": sum(utilisation) / max(len(utilisation), 1),
    "gpu_utilisation_max_pct": max(utilisation, default=0),
    "gpu_memory_used_max_mib": max(memory, default=0),
    "sweep_seconds": end - start,
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(f"\n| {single['device']} | value |\n|---|---:|")
for key, value in {**{k: v for k, v in single.items() if k.endswith(("per_second", "_vs_plain"))},
                   **summary}.items():
    if isinstance(value, float):  # ratios and shares with 3 figures, rates to one decimal
        value = f"{value:,.1f}" if value >= 100 else f"{value:.3g}"
    print(f"| {key} | {value} |")
print(f"\nwrote {out}/summary.json, single_trial.json, gpu-utilisation.csv, sweep.log")
EOF
