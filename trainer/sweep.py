"""--head_sweep: several heads trained side by side in phase 1, and the choice among them.

The heads are trained in the same step, on the same cached features and batches, each with
its own learning rate, dropout and label smoothing. Every head starts from the same initial
weights and the same dropout seed as the classifier's own head, so a head trains exactly as
a job given its settings would: the sweep reproduces each of those jobs, and a one-point grid
is the job itself. The best head by final validation accuracy (ties: the lower validation
loss, then the first) is copied into the classifier, and phase 2 continues from it with its
dropout and label smoothing.

A run without --head_sweep is the one-head case of Heads: the classifier's own head, chosen
from the start. Heads owns the heads, their optimizers and random state, and the choice; the
curves are the run's record's (run_record.py), and it trains nothing itself.
"""

import math

from trainer import model as model_lib
from trainer import steps
from trainer.errors import UserError


class Heads:
    """The heads phase 1 trains, a point of the grid each (`settings`, config.head_settings()):
    the first is the classifier's own head, the others copies of it."""

    def __init__(self, settings, classifier_head, strategy):
        self.settings = settings
        self.chosen = 0 if len(settings) == 1 else None  # the head phase 2 continues from
        self.label_smoothing = settings[0]["label_smoothing"]  # of the head being trained
        with strategy.scope():
            self.models = [classifier_head] + [model_lib.copy_head(classifier_head)
                                               for _ in settings[1:]]
        for head, point in zip(self.models, settings):
            model_lib.set_dropout(head, point["dropout"])
        self.optimizers = []  # those of the other heads: the classifier's is the phase's own

    def build_optimizers(self, make_optimizer):
        """make_optimizer(learning_rate, variables) for each head besides the first."""
        self.optimizers = [make_optimizer(point["learning_rate"], head.trainable_variables)
                           for head, point in zip(self.models[1:], self.settings[1:])]

    def checkpointed(self):
        """What a checkpoint keeps of the other heads: weights, optimizers, dropout state."""
        return {"sweep_heads": self.models[1:], "sweep_optimizers": self.optimizers,
                "sweep_random_state": [variable for head in self.models[1:]
                                       for variable in model_lib.random_state(head)]}

    def sweeping(self, phase):
        """Whether `phase` trains the heads side by side."""
        return phase.name == "head" and self.chosen is None

    def learning_rates(self, phase):
        """The learning rate of each model `phase` trains."""
        if phase.name == "head":
            return [point["learning_rate"] for point in self.settings]
        return [phase.learning_rate]

    def learners(self, phase, first):
        """The steps.Learners `phase` trains: `first`, the classifier's, and while sweeping
        each other head with its optimizer and label smoothing."""
        if not self.sweeping(phase):
            return [first]
        return [first] + [steps.Learner(head, head.trainable_variables, optimizer,
                                        point["label_smoothing"])
                          for head, optimizer, point in zip(self.models[1:], self.optimizers,
                                                            self.settings[1:])]

    def take(self, index, copy_weights):
        """Continues with head `index`: its weights (unless the checkpoint restored them),
        dropout and label smoothing become the classifier's."""
        if copy_weights and index:
            for target, source in zip(self.models[0].variables, self.models[index].variables):
                target.assign(source)
        point = self.settings[index]
        model_lib.set_dropout(self.models[0], point["dropout"])
        self.label_smoothing = point["label_smoothing"]
        self.chosen = index


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
