"""The progress line: best so far, trials done, and an estimate of time left."""

from types import SimpleNamespace

from jobs.progress import ProgressLine, format_seconds, progress_bar


class FakeTrial(SimpleNamespace):
    def __str__(self):
        return self.name


def trial(name, status, epoch, val_acc=0.5):
    return FakeTrial(name=name, status=status, last_result={"epoch": epoch, "val_acc": val_acc})


def test_line_reports_best_done_and_time_left():
    lines = []
    progress = ProgressLine(num_samples=4, max_epochs=10, printer=lambda text, flush: lines.append(text))
    progress.started -= 60  # a minute in
    trials = [trial("a", "TERMINATED", 10), trial("b", "RUNNING", 5), trial("c", "TERMINATED", 2)]
    progress.on_trial_result(0, trials, trials[1], {"epoch": 5, "val_acc": 0.61})
    progress.on_trial_result(0, trials, trials[1], {"epoch": 5, "val_acc": 0.55})
    line = lines[-1]
    assert "trials 2/4 done" in line and "best 0.6100" in line and "epoch 5/10" in line
    # 17 epochs in 60 s; 5 left in trial b and 10 for the unlaunched trial: 15 * 60/17 = 52 s
    assert "at most 52s left" in line
    assert progress_bar(17, 40).count("#") == 8


def test_diverged_results_never_count_as_best():
    lines = []
    progress = ProgressLine(2, 3, printer=lambda text, flush: lines.append(text))
    progress.on_trial_result(0, [], "t", {"epoch": 1, "val_acc": 0.0, "diverged": 1})
    assert "best n/a" in lines[-1]
    assert format_seconds(125) == "2m05s"


def test_table_lists_every_trial_with_status_epoch_and_accuracy():
    trials = [trial("trial-a", "TERMINATED", 10, 0.61), trial("trial-b", "RUNNING", 3, 0.42)]
    trials[1].last_result["diverged"] = 1
    lines = ProgressLine.table(trials).splitlines()
    assert lines[0].split() == ["trial", "status", "epoch", "val_acc"]
    assert lines[1].split() == ["trial-a", "TERMINATED", "10", "0.6100"]
    assert lines[2].split() == ["trial-b", "RUNNING", "3", "diverged"]
