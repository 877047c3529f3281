"""trainables.optim.SGD makes torch.optim.SGD's update, and a process that uses it never imports torch._dynamo."""

import subprocess
import sys

import pytest
import torch

from trainables.model import LeNet
from trainables.optim import SGD


def _trajectories(momentum: float, weight_decay: float, nesterov: bool, steps: int = 6):
    """Parameters after each step of both optimisers, same model, data and lr schedule."""
    torch.manual_seed(0)
    ours_model, torch_model = LeNet(), LeNet()
    torch_model.load_state_dict(ours_model.state_dict())
    ours = SGD(ours_model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    reference = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov)
    for step in range(steps):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        lr = 0.1 / (step + 1)  # the loop changes the lr every step
        ours.lr = lr
        for group in reference.param_groups:
            group["lr"] = lr
        for model, optimizer in ((ours_model, ours), (torch_model, reference)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        yield list(ours_model.parameters()), list(torch_model.parameters())


@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.9, 5e-4, True), (0.9, 0.0, False), (0.0, 1e-3, False)])
def test_sgd_follows_torch_optim_sgd_step_for_step(momentum, weight_decay, nesterov):
    moved = False
    for ours, reference in _trajectories(momentum, weight_decay, nesterov):
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        moved = True
    assert moved


def test_momentum_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = LeNet()
    first = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    first.step()
    second = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    second.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(first.momentum_buffers, second.momentum_buffers))
    with pytest.raises(ValueError, match="do not match"):
        SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9).load_state_dict(first.state_dict())


def test_a_training_process_never_imports_torch_dynamo():
    # What the class is for: torch.optim imports torch._dynamo (76 MB, 0.8 s per trial process).
    code = ("import sys; from trainables.config import DataConfig, HyperParams; "
            "from trainables.data import load_splits; from trainables.loop import fit; import torch; "
            "fit(HyperParams(epochs=1, batch_size=32), load_splits(DataConfig(source='synthetic', "
            "synthetic_train_images=128)), torch.device('cpu'), lambda metrics, checkpoint: None); "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
