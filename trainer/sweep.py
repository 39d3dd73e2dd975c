"""--head_sweep: several heads trained side by side in phase 1, and the choice among them.

The heads are trained in the same step, on the same cached features and batches, each with
its own learning rate, dropout and label smoothing. Every head starts from the same initial
weights and the same dropout seed as the classifier's own head, so a head trains exactly as
a job given its settings would: the sweep reproduces each of those jobs, and a one-point grid
is the job itself. The best head by final validation accuracy (ties: the lower validation
loss, then the first) is copied into the classifier, and phase 2 continues from it with its
dropout and label smoothing.
"""

import math

from trainer.errors import UserError


def varied(settings):
    """The names of the settings that differ between heads, in HEAD_SETTINGS order."""
    return [name for name in settings[0] if len({point[name] for point in settings}) > 1]


def label(point, names):
    """A head's name: its settings among `names` (all of them when none vary)."""
    return ", ".join(f"{name}={point[name]:g}" for name in names or point)


def choose(histories):
    """The index of the head to continue from, given each head's epoch records."""
    finals = [(index, history[-1]) for index, history in enumerate(histories)
              if _finite(history[-1])]
    if not finals:
        raise UserError("the training loss of every head of --head_sweep became infinite or "
                        "NaN: lower the learning rates of the grid and run again")
    return min(finals, key=lambda item: (-item[1]["val_accuracy"], item[1]["val_loss"],
                                         item[0]))[0]


def _finite(record):
    return all(math.isfinite(record[name]) for name in ("loss", "val_loss"))


def table(settings, histories, chosen):
    """The heads' final validation figures, one line each, the chosen one marked."""
    names = varied(settings)
    lines = [f"head sweep: {len(settings)} heads after {len(histories[0])} epochs; phase "
             "fine_tune continues from the best by validation accuracy"]
    for index, (point, history) in enumerate(zip(settings, histories)):
        final = history[-1]
        lines.append(f"  {'*' if index == chosen else ' '} {label(point, names):<48} "
                     f"val_accuracy {final['val_accuracy']:.4f} val_loss {final['val_loss']:.4f}"
                     f"{'' if _finite(final) else ' (diverged)'}")
    return "\n".join(lines)


def summary(settings, histories, chosen):
    """What metrics.json records of the sweep: every head's settings and curve, the choice."""
    names = varied(settings)
    return {"varied": names, "chosen": chosen, "chosen_settings": settings[chosen],
            "heads": [{"name": label(point, names), "settings": point, "history": history}
                      for point, history in zip(settings, histories)]}


def plan(settings):
    """The --dry_run lines of the grid."""
    names = varied(settings)
    lines = [f"  head sweep    {len(settings)} heads trained side by side on the cached "
             "features; the best by validation accuracy continues into phase fine_tune"]
    lines += [f"    {index + 1:>3}. {label(point, names)}" for index, point in enumerate(settings)]
    return lines
