"""What the job did: per-class metrics, the most confident mistakes, and report.png."""

import io

import numpy as np

from trainer import files


def evaluation_metrics(probabilities, labels, paths, class_names, worst=10):
    """Confusion matrix (rows: true, columns: predicted), per-class precision/recall/F1, and
    the validation images predicted wrong with the highest probability."""
    predicted = probabilities.argmax(axis=1)
    count = len(class_names)
    confusion = np.zeros((count, count), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for index, name in enumerate(class_names):
        hits = confusion[index, index]
        precision = hits / max(1, confusion[:, index].sum())
        recall = hits / max(1, confusion[index, :].sum())
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(float(precision), 4),
                           "recall": round(float(recall), 4), "f1": round(float(f1), 4),
                           "support": int(confusion[index, :].sum())}
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:worst]
    mistakes = [{"path": str(paths[i]), "true": class_names[labels[i]],
                 "predicted": class_names[predicted[i]],
                 "probability": round(float(probabilities[i, predicted[i]]), 4)} for i in wrong]
    return {"per_class": per_class, "confusion_matrix": confusion.tolist(),
            "most_confident_mistakes": mistakes}


def plot(history, confusion, class_names, path, head_sweep=None):
    """report.png (see figure()), written to path."""
    from matplotlib import pyplot
    drawn = figure(history, confusion, class_names, head_sweep)
    buffer = io.BytesIO()
    drawn.savefig(buffer, format="png", dpi=80)
    pyplot.close(drawn)
    files.write_bytes(path, buffer.getvalue())


def figure(history, confusion, class_names, head_sweep=None):
    """Loss and accuracy per epoch for both phases, the phase boundary marked (as in the TF
    tutorial's plot), the validation confusion matrix, and with --head_sweep every head's
    validation accuracy in phase 1 (sweep.summary's)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib import ticker

    epochs = [row["epoch"] for row in history]
    panels = 4 if head_sweep else 3
    drawn, axes = pyplot.subplots(1, panels, figsize=(16 * panels / 3, 4.8))
    for axis, metric in zip(axes[:2], ("accuracy", "loss")):
        axis.plot(epochs, [row[metric] for row in history], "o-", label=f"training {metric}")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], "o-",
                  label=f"validation {metric}")
        head_epochs = [row["epoch"] for row in history if row["phase"] == "head"]
        if head_epochs and len(head_epochs) < len(history):
            axis.axvline(max(head_epochs) + 0.5, color="grey", linestyle="--",
                         label="start fine-tuning")
        _whole_epochs(axis, ticker)
        axis.set_title(metric.capitalize())
        axis.legend()
    confusion = np.asarray(confusion)
    axes[2].imshow(confusion, cmap="Blues")
    axes[2].set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes[2].set_yticks(range(len(class_names)), class_names)
    for (row, column), value in np.ndenumerate(confusion):
        axes[2].text(column, row, str(value), ha="center", va="center",
                     color="white" if value > confusion.max() / 2 else "black")
    axes[2].set_xlabel("predicted")
    axes[2].set_ylabel("true")
    axes[2].set_title("Validation confusion matrix")
    if head_sweep:
        _plot_heads(axes[3], head_sweep)
        _whole_epochs(axes[3], ticker)
    drawn.tight_layout()
    return drawn


def _whole_epochs(axis, ticker):
    """Epochs are whole numbers, and values are shown as they are: no offset such as
    1e-6+6.931e-1 above an axis whose values hardly change."""
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axis.yaxis.get_major_formatter().set_useOffset(False)


# More heads than this in the legend would cover the panel: the chosen one is named alone.
LEGEND_HEADS = 8


def _plot_heads(axis, head_sweep):
    """Every head's validation accuracy per epoch; the chosen one bold."""
    heads = head_sweep["heads"]
    for index, head in enumerate(heads):
        chosen = index == head_sweep["chosen"]
        named = chosen or len(heads) <= LEGEND_HEADS
        axis.plot([row["epoch"] for row in head["history"]],
                  [row["val_accuracy"] for row in head["history"]], "o-",
                  linewidth=3 if chosen else 1, alpha=1 if chosen else 0.6,
                  color=None if named else "grey",
                  label=head["name"] + (" (chosen)" if chosen else "") if named else None)
    others = "" if len(heads) <= LEGEND_HEADS else f" ({len(heads) - 1} others in grey)"
    axis.set_title(f"Head sweep: validation accuracy{others}")
    axis.legend(fontsize="small")
