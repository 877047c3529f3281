"""A one-line progress report per epoch: trials done, best so far, elapsed and time left."""

from __future__ import annotations

import time

from ray import tune


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class ProgressLine(tune.Callback):
    """Prints, after every epoch any trial reports, where the sweep stands.

    The estimate of time left assumes every unfinished trial runs all its epochs at
    the pace seen so far, so with ASHA stopping trials early it is an upper bound.
    """

    TABLE_EVERY_S = 30  # seconds between prints of the table of all trials

    def __init__(self, num_samples: int, max_epochs: int, printer=None):
        self.num_samples = num_samples
        self.max_epochs = max_epochs
        self.printer = printer  # None = print; Tune pickles callbacks, and Ray patches print
        self.started = time.time()
        self.last_table = 0.0
        self.best = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get("val_acc")
        if isinstance(value, (int, float)) and not result.get("diverged"):
            self.best = value if self.best is None else max(self.best, value)
        show = self.printer or print
        if time.time() - self.last_table >= self.TABLE_EVERY_S:
            self.last_table = time.time()
            show(self.table(trials), flush=True)
        show(self.line(trials, trial, result), flush=True)

    def on_experiment_end(self, trials, **info):
        (self.printer or print)(self.table(trials), flush=True)

    @staticmethod
    def table(trials) -> str:
        """Every trial's status, epoch and validation accuracy."""
        rows = [f"{'trial':<22} {'status':<11} {'epoch':>5} {'val_acc':>8}"]
        for trial in trials:
            last = trial.last_result or {}
            acc = last.get("val_acc")
            acc_text = "diverged" if last.get("diverged") else ("" if acc is None else f"{acc:.4f}")
            rows.append(f"{str(trial):<22} {trial.status:<11} {last.get('epoch', ''):>5} {acc_text:>8}")
        return "\n".join(rows)

    def line(self, trials, trial, result) -> str:
        finished = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        epochs_done = sum(int((t.last_result or {}).get("epoch", 0)) for t in trials)
        epochs_total = self.num_samples * self.max_epochs
        epochs_left = sum(self.max_epochs - int((t.last_result or {}).get("epoch", 0))
                          for t in trials if t not in finished)
        epochs_left += (self.num_samples - len(trials)) * self.max_epochs  # not launched yet
        elapsed = time.time() - self.started
        left = epochs_left * elapsed / max(epochs_done, 1)
        best = "n/a" if self.best is None else f"{self.best:.4f}"
        return (f"{progress_bar(epochs_done, epochs_total)} {trial} epoch {result.get('epoch')}/{self.max_epochs} "
                f"val_acc {result.get('val_acc', float('nan')):.4f} | trials {len(finished)}/{self.num_samples} done "
                f"| best {best} | elapsed {format_seconds(elapsed)}, at most {format_seconds(left)} left")
