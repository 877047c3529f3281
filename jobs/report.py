"""The sweep report: a folder of plots, a results table and an index.html that shows them all.

A sweep writes it at the end (into the results folder, and to MLflow under report/ on
the parent run); open it with any browser, offline:
    lenet-tune tune --smoke && xdg-open results/<sweep>/report/index.html
From Python, on tables you already have:
    from jobs.report import build_report
    build_report(trials, curves, confusion, classes, max_epochs=10, out_dir=Path("report"))
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.evaluation import plot_confusion, pyplot, summarize
from trainables.tracking import stopped_early

HYPERPARAMETERS = ("lr", "batch_size", "momentum", "dilation", "padding", "augment")
TOP_CURVES = 5  # trials drawn on the learning-curve plot
PLOTS = {  # file -> caption, in the order index.html shows them
    "parallel_coordinates.png": "Hyperparameters of every trial against its best validation accuracy",
    "learning_curves.png": f"Validation accuracy and training loss per epoch of the top {TOP_CURVES} trials",
    "early_stopping.png": "Epochs each trial ran: where ASHA stopped trials early, and which diverged",
    "confusion_matrix.png": "Best model of the sweep on the test split: confusion matrix (rows = true class)",
    "per_class_accuracy.png": "Best model of the sweep on the test split: accuracy per class",
}


def build_report(trials: pd.DataFrame, curves: dict[str, pd.DataFrame], confusion: list[list[int]],
                 classes: list[str], max_epochs: int, out_dir: Path) -> Path:
    """Write trials.csv, five PNG plots and index.html into out_dir; return index.html's path.

    trials: one row per trial (trial_id, the HYPERPARAMETERS, best_val_acc, epochs_run,
    stopped_early, diverged, status); curves: trial_id -> (epoch, train_loss, val_loss, val_acc).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Best first, as the sweep picks its best checkpoint; a trial without one healthy epoch (NaN) goes last.
    ranked = trials.sort_values("best_val_acc", ascending=False, na_position="last", kind="stable")
    ranked = ranked.reset_index(drop=True)
    ranked.to_csv(out_dir / "trials.csv", index=False)
    confusion = np.asarray(confusion, dtype=np.int64)
    summary = summarize(confusion, classes)
    plt = pyplot()
    figures = {
        "parallel_coordinates.png": plot_parallel_coordinates(ranked),
        "learning_curves.png": plot_learning_curves(ranked, curves),
        "early_stopping.png": plot_early_stopping(ranked, max_epochs),
        "confusion_matrix.png": plot_confusion(confusion, classes),
        "per_class_accuracy.png": plot_per_class(summary, classes),
    }
    for name, figure in figures.items():
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
    index = out_dir / "index.html"
    index.write_text(render_index(ranked, summary["test_acc"], int(confusion.sum()), max_epochs), encoding="utf-8")
    return index


CURVE_COLUMNS = ["epoch", "train_loss", "val_loss", "val_acc"]


def tables_from_results(results, params_of, max_epochs: int) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(trials, curves) for build_report from a Tune ResultGrid.

    params_of(config) turns a trial's sampled config into its full hyperparameters
    (the sweep passes `lambda c: trial_hparams(base, c).model_dump()`, from trainables/trial.py).
    """
    rows, curves = [], {}
    for result in results:
        history = result.metrics_dataframe
        if history is None or history.empty:
            history = pd.DataFrame(columns=CURVE_COLUMNS + ["diverged"])
        # A resumed trial may report an epoch twice: keep the last report of each epoch.
        history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
        trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial-"))
        diverged_rows = history.get("diverged", pd.Series(0, index=history.index)).fillna(0).astype(bool)
        healthy = history.loc[~diverged_rows, "val_acc"] if "val_acc" in history else pd.Series(dtype=float)
        epochs_run = int(history["epoch"].max()) if len(history) else 0
        diverged = bool(diverged_rows.any())
        params = params_of(result.config)
        rows.append({"trial_id": trial_id, **{name: params.get(name) for name in HYPERPARAMETERS},
                     "best_val_acc": float(healthy.max()) if len(healthy) else float("nan"),
                     "epochs_run": epochs_run,
                     "stopped_early": stopped_early(result.error is None, diverged, epochs_run, max_epochs),
                     "diverged": diverged,
                     "status": "ERROR" if result.error is not None else "TERMINATED"})
        curves[trial_id] = history.reindex(columns=CURVE_COLUMNS).reset_index(drop=True)
    return pd.DataFrame(rows), curves


def axis_values(column: pd.Series) -> tuple[np.ndarray, list[float], list[str]]:
    """A column as numbers in [0, 1] plus its tick positions and labels.

    lr spans decades, so it is placed on a log scale; text columns (augment) get one
    evenly spaced position per category.
    """
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        categories = sorted(column.astype(str).unique())
        codes = column.astype(str).map({c: i for i, c in enumerate(categories)}).to_numpy(float)
        span = max(len(categories) - 1, 1)
        return codes / span, [i / span for i in range(len(categories))], categories
    values = column.to_numpy(float)
    known = values[np.isfinite(values)]
    log = column.name == "lr" and len(known) > 0 and bool(np.all(known > 0))
    place = np.log10 if log else np.asarray
    low, high = (float(place(known).min()), float(place(known).max())) if len(known) else (0.0, 1.0)

    def scale(v):
        return (place(v) - low) / (high - low) if high > low else np.full_like(np.asarray(v, float), 0.5)

    ticks = sorted(set(known.tolist()))
    if len(ticks) > 5:  # a continuous column: label its ends only
        ticks = [ticks[0], ticks[-1]]
    scaled = scale(values)
    positions = [float(scale(np.array([t]))[0]) for t in ticks]
    return scaled, positions, [f"{t:.3g}" for t in ticks]


def plot_parallel_coordinates(ranked: pd.DataFrame):
    plt = pyplot()
    columns = [c for c in HYPERPARAMETERS if c in ranked] + ["best_val_acc"]
    figure, axes = plt.subplots(figsize=(10, 5))
    scaled = {}
    for x, name in enumerate(columns):
        scaled[name], positions, labels = axis_values(ranked[name])
        axes.axvline(x, color="grey", linewidth=0.8)
        for position, label in zip(positions, labels):
            axes.text(x + 0.04, position, label, fontsize=7, va="center")
    colour_map = plt.get_cmap("viridis")
    accuracies = ranked["best_val_acc"].to_numpy(float)
    finite = accuracies[np.isfinite(accuracies)]
    low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    for row in range(len(ranked)):
        points = [scaled[name][row] for name in columns]
        if bool(ranked["diverged"].iloc[row]) or not np.isfinite(accuracies[row]):
            # Dashed red; one that diverged before any healthy epoch has no accuracy: drawn at the floor.
            points[-1] = points[-1] if np.isfinite(points[-1]) else 0.0
            axes.plot(range(len(columns)), points, color="red", linestyle="--", alpha=0.8)
        else:
            shade = (accuracies[row] - low) / (high - low) if high > low else 1.0
            axes.plot(range(len(columns)), points, color=colour_map(shade), alpha=0.9,
                      linewidth=2.5 if row == 0 else 1.2)
    axes.set_xticks(range(len(columns)), columns)
    axes.set_yticks([])
    axes.set_xlim(-0.2, len(columns) - 0.5)
    axes.set_ylim(-0.05, 1.05)
    axes.set_title("trials: hyperparameters -> best val_acc (bright = better, thick = best, red dashed = diverged)")
    figure.tight_layout()
    return figure


def plot_learning_curves(ranked: pd.DataFrame, curves: dict[str, pd.DataFrame]):
    plt = pyplot()
    figure, (acc_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    shown = ranked[ranked["best_val_acc"].notna()].head(TOP_CURVES)  # a NaN loss leaves a gap in the line
    for _, trial in shown.iterrows():
        curve = curves.get(str(trial["trial_id"]))
        if curve is None or curve.empty:
            continue
        curve = curve.sort_values("epoch")
        label = f"{trial['trial_id']} (lr {trial['lr']:.3g}, bs {trial['batch_size']})"
        acc_axes.plot(curve["epoch"], curve["val_acc"], marker="o", label=label)
        loss_axes.plot(curve["epoch"], curve["train_loss"], marker="o", label=label)
    acc_axes.set(xlabel="epoch", ylabel="val_acc", title="validation accuracy")
    loss_axes.set(xlabel="epoch", ylabel="train_loss", title="training loss")
    for axes in (acc_axes, loss_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    if len(shown):
        acc_axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def trial_outcome(trial: pd.Series, max_epochs: int) -> str:
    if bool(trial["diverged"]):
        return "diverged"
    if bool(trial["stopped_early"]):
        return "stopped early (ASHA)"
    if str(trial["status"]).upper() == "ERROR":
        return "error"
    return "completed" if int(trial["epochs_run"]) >= max_epochs else "ended early"


OUTCOME_COLOURS = {"completed": "tab:green", "stopped early (ASHA)": "tab:orange", "diverged": "tab:red",
                   "error": "tab:grey", "ended early": "tab:blue"}


def plot_early_stopping(ranked: pd.DataFrame, max_epochs: int):
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(ranked) + 1.5))
    outcomes = [trial_outcome(trial, max_epochs) for _, trial in ranked.iterrows()]
    rows = range(len(ranked))[::-1]  # best trial on top
    axes.barh(list(rows), ranked["epochs_run"].astype(int), color=[OUTCOME_COLOURS[o] for o in outcomes])
    for row, (_, trial), outcome in zip(rows, ranked.iterrows(), outcomes):
        accuracy = trial["best_val_acc"]
        text = outcome if pd.isna(accuracy) or outcome == "diverged" else f"{outcome}, val_acc {accuracy:.3f}"
        axes.text(int(trial["epochs_run"]) + 0.1, row, text, va="center", fontsize=8)
    axes.axvline(max_epochs, color="black", linestyle=":", label=f"max epochs ({max_epochs})")
    axes.set_yticks(list(rows), [str(t) for t in ranked["trial_id"]], fontsize=8)
    axes.set_xlim(0, max_epochs * 1.6 + 1)
    axes.set_xlabel("epochs run")
    axes.set_title("epochs per trial: ASHA stops the weaker trials early")
    handles = [plt.Rectangle((0, 0), 1, 1, color=OUTCOME_COLOURS[o]) for o in OUTCOME_COLOURS if o in outcomes]
    axes.legend(handles + [axes.get_lines()[0]], [o for o in OUTCOME_COLOURS if o in outcomes]
                + [f"max epochs ({max_epochs})"], fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def plot_per_class(summary: dict, classes: list[str]):
    """summary: trainables.evaluation.summarize of the best model's confusion matrix."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar(list(classes), [summary["per_class_acc"][c] for c in classes], color="tab:blue")
    axes.axhline(summary["test_acc"], color="black", linestyle="--", label=f"overall {summary['test_acc']:.3f}")
    axes.axhline(1 / max(len(classes), 1), color="grey", linestyle=":", label="chance")
    axes.set(ylim=(0, 1.05), ylabel="test accuracy", title="best model: test accuracy per class")
    axes.tick_params(axis="x", rotation=45)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def render_index(ranked: pd.DataFrame, test_acc: float, test_images: int, max_epochs: int) -> str:
    """index.html: a summary, every plot inline, and the table; relative links only, nothing fetched."""
    esc = html.escape
    outcomes = [trial_outcome(trial, max_epochs) for _, trial in ranked.iterrows()]
    healthy = ranked[ranked["best_val_acc"].notna()]
    if len(healthy):
        best = healthy.iloc[0]
        params = ", ".join(f"{name}={best[name]}" for name in HYPERPARAMETERS if name in best)
        best_line = (f"<p>Best trial <b>{esc(str(best['trial_id']))}</b>: val_acc "
                     f"<b>{best['best_val_acc']:.4f}</b> after {int(best['epochs_run'])} epochs, with {esc(params)}.</p>")
    else:
        best_line = "<p>No trial finished an epoch without diverging.</p>"
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in OUTCOME_COLOURS if outcomes.count(o))
    figures = "\n".join(
        f'<figure><a href="{name}"><img src="{name}" alt="{esc(caption)}"></a>'
        f"<figcaption>{esc(caption)}</figcaption></figure>" for name, caption in PLOTS.items())
    table = ranked.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0, escape=True)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lenet-tune sweep report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1150px; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; text-align: right; }}
</style></head>
<body>
<h1>Sweep report</h1>
{best_line}
<p>{len(ranked)} trials ({esc(counts)}) of at most {max_epochs} epochs.
Best model's test accuracy {test_acc:.4f} over {test_images} test images.</p>
<p>Results table: <a href="trials.csv">trials.csv</a></p>
{figures}
<h2>All trials</h2>
{table}
</body></html>
"""
