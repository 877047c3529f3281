"""On a CUDA device: the loop batches on the GPU from data held there, in float32 NCHW (what measured
fastest for LeNet: benchmarks/gpu.sh), and a fractional-GPU sweep runs four trials on one card at once.

Deselected by default and skipped without CUDA: `pytest -m gpu tests/test_gpu.py` (benchmarks/gpu.sh
measures the speed; these check the mechanisms).
"""

import pytest
import torch

from helpers import finished_sweep, write_config
from trainables.config import DataConfig, HyperParams
from trainables.data import load_splits
from trainables.loop import fit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataConfig(source="synthetic", synthetic_train_images=1500))


def test_fit_on_gpu_batches_on_the_device_in_float32_nchw(splits):
    seen = []

    def watch(model):
        # What every forward pass gets: where the batch lives, its dtype and layout, whether autocast is on.
        def hook(module, args):
            x = args[0]
            seen.append((x.device.type, x.dtype, x.is_contiguous(), torch.is_autocast_enabled("cuda")))
        model.register_forward_pre_hook(hook)
        return model.cuda()

    reports = []
    fit(HyperParams(epochs=3, batch_size=32, lr=0.05), splits, torch.device("cuda"),
        lambda metrics, _: reports.append(metrics), wrap_model=watch)
    assert seen and set(seen) == {("cuda", torch.float32, True, False)}
    assert reports[-1]["train_loss"] < 0.5 * reports[0]["train_loss"]
    assert reports[-1]["val_acc"] > 0.5  # chance is 0.1


def test_quarter_gpu_trials_run_four_at_once_on_one_gpu(tmp_path):
    import ray

    from jobs.cli import main
    from jobs.runtime import connect_ray

    if torch.cuda.device_count() != 1:
        pytest.skip("counts trials on one GPU")
    if not ray.is_initialized():
        connect_ray(num_cpus=8)  # CPUs for eight 1-CPU trials: only the GPU share can hold them to four
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # 3 epochs of 20,000 images: seconds per trial on a GPU, so a trial cannot end before the fourth starts.
    code = main(["tune", "--config", write_config(tmp_path, images=20_000), "--name", "packed", "--num-samples", "5",
                 "--epochs", "3", "--scheduler", "fifo", "--gpus-per-worker", "0.25", "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "results")])
    assert code == 0
    _, _, trials = finished_sweep(uri, "packed", trials=5, epochs=3)
    spans = sorted((r.info.start_time, r.info.end_time) for r in trials)
    first_end = min(end for _, end in spans[:4])
    # The first four started before any of them ended: four quarter-GPU trials shared the card at once.
    assert all(start < first_end for start, _ in spans[:4])
    # The fifth waited for a quarter to come free.
    assert spans[4][0] >= first_end
