"""Report tables and plots of `braindino evaluate`: `table.md` / `table.csv`, label efficiency and k-NN accuracy.

Figures are drawn on `matplotlib.figure.Figure` objects and written as PNG, without pyplot or a global backend:
the package never changes the matplotlib state of the process that imports it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

LOWER_IS_BETTER = {"mae", "rmse", "hd95_whole_tumor"}


def new_figure(**kwargs):
    """A figure with one axis, independent of pyplot (so of any backend the caller has chosen)."""
    figure = Figure(**kwargs)
    return figure, figure.subplots()


def write_tables(summary: dict, out: Path) -> None:
    metric = summary["primary_metric"]
    rows = summary["rows"]
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [f"# {summary['task']}: {summary['target']} from {', '.join(summary['inputs'])}"
             + (" (SYNTHETIC data)" if summary["synthetic_data"] else ""), "",
             f"Primary metric: {metric} ({direction} is better); mean ± std over seeds, and the mean of the per-run "
             "bootstrap 95 % intervals over test subjects.", "", f"Protocol: {summary['protocol']}.", "",
             f"| backbone | labels | training subjects | {metric} | 95 % CI | runs |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "note" in row:  # a label fraction too small for the task
            lines.append(f"| {row['backbone']} | {row['label_fraction']:.0%} | — | {row['note']} | — | 0 |")
            continue
        mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
        score = f"{mean:.3f} ± {std:.3f}" if mean is not None and np.isfinite(mean) else "undefined"
        defined = row["ci_low_mean"] is not None and np.isfinite(row["ci_low_mean"])
        interval = f"[{row['ci_low_mean']:.3f}, {row['ci_high_mean']:.3f}]" if defined else "—"
        lines.append(f"| {row['backbone']} | {row['label_fraction']:.0%} | {row['training_subjects']} | {score} | {interval} | {row['runs']} |")
    if "knn" in summary:
        knn = summary["knn"]
        ks = sorted({int(k) for accuracy in knn["accuracy"].values() for k in accuracy})
        lines += ["", f"k-NN probe (cosine, L2-normalised subject embeddings; seed {knn['seed']} split, "
                  f"{knn['test_cases']} test cases): accuracy", "",
                  "| backbone | " + " | ".join(f"k={k}" for k in ks) + " |", "| --- |" + " --- |" * len(ks)]
        for name, accuracy in knn["accuracy"].items():
            lines.append(f"| {name} | " + " | ".join(f"{accuracy.get(str(k), float('nan')):.3f}" for k in ks) + " |")
        for name, tests in knn["mcnemar_vs_first"].items():
            lines.append("")
            lines.append(f"exact McNemar, {name} vs {next(iter(knn['accuracy']))}: "
                         + ", ".join(f"k={k} p={test['p_value']:.3g}" for k, test in tests.items()))
    if "kaplan_meier" in summary:
        lines += ["", "Kaplan–Meier split at the median training risk (largest fraction, first seed):"]
        lines += [f"- {name}: log-rank p = {values['log_rank_p']:.3g}" if values["log_rank_p"] is not None
                  else f"- {name}: {values['note']}" for name, values in summary["kaplan_meier"].items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot_label_efficiency(summary: dict, out: Path) -> None:
    metric = summary["primary_metric"]
    figure, axis = new_figure(figsize=(5, 3.5))
    for name in summary["backbones"]:
        rows = [row for row in summary["rows"] if row["backbone"] == name and row.get(f"{metric}_mean") is not None]
        axis.errorbar([row["label_fraction"] for row in rows], [row[f"{metric}_mean"] for row in rows],
                      yerr=[row[f"{metric}_std"] for row in rows], marker="o", capsize=3, label=name)
    axis.set_xscale("log")
    axis.set_xlabel("fraction of training labels")
    axis.set_ylabel(metric)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "label_efficiency.png", dpi=110)


def plot_knn(section: dict, out: Path) -> None:
    figure, axis = new_figure(figsize=(5, 3.5))
    for name, accuracy in section["accuracy"].items():
        axis.plot([int(k) for k in accuracy], list(accuracy.values()), marker="o", label=name)
    axis.set_xscale("log")
    axis.set_xlabel("k")
    axis.set_ylabel("k-NN accuracy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "knn_accuracy.png", dpi=110)
