"""--head_sweep: heads trained side by side in phase 1, each as its own run would train it."""

import json
import os
import signal

import numpy as np
import pytest

from tests.conftest import error_line, run_module
from tests.test_train import tiny_trainer
from trainer import config as config_lib
from trainer import sweep
from trainer import train
from trainer.errors import Stopped

# Every setting varied, dropout at 0 too (Keras draws a Dropout layer's random state only
# at a rate above 0): 8 heads, none at the rate the classifier is built with.
GRID = "learning_rate=1e-3,1e-2;dropout=0.5,0;label_smoothing=0.2,0"
SETTINGS = dict(epochs=2, fine_tune_epochs=1, dropout=0.3)


def _run(tmp_path, phases=("head", "fine_tune"), **settings):
    """(trainer history, every weight, the head histories, the chosen head) of a run."""
    with tiny_trainer(tmp_path, **{**SETTINGS, **settings}) as trainer:
        trainer.restore()
        for name in phases:
            trainer.fit(getattr(trainer.schedule, name))
        return (trainer.history, [weight.numpy() for weight in trainer.classifier.model.weights],
                trainer.head_histories, trainer.chosen)


def _curves(history):
    return [(row["phase"], row["loss"], row["accuracy"], row["val_loss"], row["val_accuracy"])
            for row in history]


def test_each_head_trains_exactly_as_a_run_with_its_settings(tmp_path):
    history, weights, heads, chosen = _run(tmp_path / "sweep", head_sweep=GRID)
    points = config_lib.Config(head_sweep=GRID, **SETTINGS).head_settings()
    assert len(heads) == len(points) == 8
    alone = [_run(tmp_path / f"alone{index}", phases=("head",), **point)[0]
             for index, point in enumerate(points)]
    for head, own in zip(heads, alone):
        assert _curves(head) == _curves(own)
    assert chosen == sweep.choose(alone)
    assert chosen != 0  # so that the chosen head's weights are copied into the classifier's
    # Phase 2 goes on from the chosen head, with its settings: the run of those settings.
    best = points[chosen]
    whole = _run(tmp_path / "best", **best)
    assert _curves(history) == _curves(whole[0])
    for mine, theirs in zip(weights, whole[1]):
        np.testing.assert_array_equal(mine, theirs)


def test_a_one_point_grid_is_the_run_itself(tmp_path):
    swept = _run(tmp_path / "sweep", head_sweep="learning_rate=1e-3")
    plain = _run(tmp_path / "plain", learning_rate=1e-3)
    assert _curves(swept[0]) == _curves(plain[0]) and swept[3] == 0
    for mine, theirs in zip(swept[1], plain[1]):
        np.testing.assert_array_equal(mine, theirs)


def test_a_sweep_resumed_after_phase_1_keeps_its_choice(tmp_path):
    whole = _run(tmp_path / "whole", head_sweep=GRID)
    _run(tmp_path / "resumed", phases=("head",), head_sweep=GRID)
    resumed = _run(tmp_path / "resumed", phases=("fine_tune",), head_sweep=GRID)
    assert resumed[3] == whole[3] and _curves(resumed[0]) == _curves(whole[0])
    for mine, theirs in zip(resumed[1], whole[1]):
        np.testing.assert_array_equal(mine, theirs)


def test_a_sweep_stopped_mid_epoch_resumes_bit_for_bit(tmp_path):
    settings = dict(batch_size=4, head_sweep=GRID)  # 2 steps an epoch
    whole = _run(tmp_path / "whole", **settings)
    with tiny_trainer(tmp_path / "stopped", **{**SETTINGS, **settings}) as first:
        # Stopped by a signal during step 3: checkpointed after it, mid-epoch 2 of phase 1.
        chunk = first._chunk
        first._chunk = lambda step, end: (step == 2 and first.stop._request(signal.SIGTERM, None)
                                          or chunk(step, end))
        with pytest.raises(Stopped):
            first.fit(first.schedule.head)
    resumed = _run(tmp_path / "stopped", **settings)
    assert [_curves(head) for head in resumed[2]] == [_curves(head) for head in whole[2]]
    assert resumed[3] == whole[3] and _curves(resumed[0]) == _curves(whole[0])
    for mine, theirs in zip(resumed[1], whole[1]):
        np.testing.assert_array_equal(mine, theirs)


def test_the_best_head_has_the_best_accuracy_then_the_lower_loss():
    def record(accuracy, loss):
        return [{"loss": 1.0, "val_loss": loss, "val_accuracy": accuracy}]
    assert sweep.choose([record(0.5, 0.1), record(0.9, 0.7), record(0.9, 0.6)]) == 2
    assert sweep.choose([record(0.9, 0.6), record(0.9, 0.6)]) == 0
    assert sweep.choose([record(0.9, float("nan")), record(0.1, 2.0)]) == 1


def test_the_grid_is_every_combination_in_order_over_the_flags_values():
    config = config_lib.Config(head_sweep="learning_rate=1e-3,1e-2; dropout=0,0.5",
                               label_smoothing=0.1)
    assert config.head_settings() == [
        {"learning_rate": rate, "dropout": dropout, "label_smoothing": 0.1}
        for rate in (1e-3, 1e-2) for dropout in (0, 0.5)]
    assert config_lib.Config(dropout=0.3).head_settings() == [
        {"learning_rate": 1e-4, "dropout": 0.3, "label_smoothing": 0.0}]


@pytest.mark.parametrize("grid, overrides, expected", [
    ("momentum=0.9", {}, "is not NAME=V1,V2,... with NAME one of learning_rate"),
    ("dropout=0,x", {}, "dropout=0,x is not a comma list of numbers"),
    ("dropout=0;dropout=0.1", {}, "names dropout twice"),
    (";", {}, "is empty"),
    ("dropout=0,1.5", {}, "gives dropout=1.5, which must be in [0, 1)"),
    ("learning_rate=0,1e-3", {}, "gives learning_rate=0.0, which must be positive"),
    ("dropout=0,0.1", {"augment": "flip"}, "--augment changes every image each epoch"),
    ("dropout=0,0.1", {"cache_features": "off"}, "--cache_features=off turns them off"),
    ("dropout=0,0.1", {"epochs": 0}, "--epochs=0 leaves phase 1 no epochs"),
    ("learning_rate=" + ",".join(["1e-3"] * 65), {}, "at most 64 heads"),
])
def test_a_grid_no_sweep_can_run_is_refused_with_the_reason(grid, overrides, expected):
    problems = config_lib.Config(head_sweep=grid, **overrides).problems()
    assert [name for name, _ in problems] == ["head_sweep"]
    assert expected in problems[0][1]


@pytest.mark.slow
def test_the_cli_sweeps_reports_every_head_and_continues_from_the_best(tmp_path):
    grid = "learning_rate=1e-2,1e-3;dropout=0,0.5"
    model_dir = str(tmp_path / "run")
    plan = run_module("trainer.task", f"--model_dir={model_dir}", f"--head_sweep={grid}",
                      "--dry_run")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "phase head      epochs 1-5 at each head's lr" in plan.stdout
    assert ("  head sweep    4 heads trained side by side on the cached features" in plan.stdout
            and "      4. learning_rate=0.001, dropout=0.5" in plan.stdout)
    process = run_module("trainer.task", f"--model_dir={model_dir}", f"--head_sweep={grid}")
    assert process.returncode == 0, process.stderr[-2000:]
    assert "epoch 5/8 [head] 4 heads, best val_accuracy" in process.stdout
    assert "head sweep: 4 heads after 5 epochs" in process.stdout
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    swept = metrics["head_sweep"]
    assert swept["varied"] == ["learning_rate", "dropout"] and len(swept["heads"]) == 4
    assert [len(head["history"]) for head in swept["heads"]] == [5] * 4
    chosen = swept["heads"][swept["chosen"]]
    assert chosen["settings"] == swept["chosen_settings"]
    assert swept["chosen"] == sweep.choose([head["history"] for head in swept["heads"]])
    # The run's curve is the chosen head's, then phase 2.
    assert metrics["history"][:5] == chosen["history"]
    assert [row["phase"] for row in metrics["history"]] == ["head"] * 5 + ["fine_tune"] * 3
    assert os.path.getsize(os.path.join(model_dir, "report.png")) > 0
    assert sorted(os.listdir(os.path.join(model_dir, "logs", "head_sweep"))) == sorted(
        head["name"].replace(", ", ",") for head in swept["heads"])


@pytest.mark.slow
def test_a_sweep_with_augmentation_is_a_one_line_error(tmp_path):
    process = run_module("trainer.task", f"--model_dir={tmp_path / 'run'}",
                         "--head_sweep=dropout=0,0.2", "--augment=flip")
    assert process.returncode == 2 and not os.path.exists(tmp_path / "run")
    assert "--head_sweep='dropout=0,0.2' needs the heads trained on cached features: " \
           "--augment changes every image" in error_line(process)


def _heads(settings, dropout=0.3):
    import tensorflow as tf
    from trainer import model
    classifier = model.build("small_cnn", "none", 16, 2, dropout)
    strategy = tf.distribute.get_strategy()
    return sweep.Heads(settings, classifier.head, strategy), classifier


def test_a_run_without_a_sweep_is_the_one_head_case():
    point = {"learning_rate": 1e-3, "dropout": 0.1, "label_smoothing": 0.2}
    heads, classifier = _heads([point])
    assert heads.chosen == 0 and heads.models == [classifier.head]
    assert classifier.head.get_layer("dropout").rate == 0.1 and heads.label_smoothing == 0.2
    heads.build_optimizers(lambda rate, variables: 1 / 0)  # no other head: none is built
    schedule = train.Schedule.of(config_lib.Config(batch_size=2), 8, 1)
    assert not heads.sweeping(schedule.head)
    assert heads.learners(schedule.head, "the classifier's") == ["the classifier's"]
    assert heads.learning_rates(schedule.head) == [1e-3]
    assert heads.learning_rates(schedule.fine_tune) == [1e-5]
    assert heads.checkpointed() == {"sweep_heads": [], "sweep_optimizers": [],
                                    "sweep_random_state": []}


def test_the_chosen_head_becomes_the_classifiers_with_its_settings():
    settings = config_lib.Config(head_sweep="dropout=0.5,0;label_smoothing=0.1,0.3"
                                 ).head_settings()
    heads, classifier = _heads(settings)
    heads.build_optimizers(lambda rate, variables: (rate, len(variables)))
    assert heads.optimizers == [(1e-4, 2)] * 3 and heads.chosen is None
    schedule = train.Schedule.of(config_lib.Config(batch_size=2), 8, 1)
    assert heads.sweeping(schedule.head) and not heads.sweeping(schedule.fine_tune)
    learners = heads.learners(schedule.head, "first")
    assert learners[0] == "first" and [learner.label_smoothing for learner in learners[1:]] == [
        0.3, 0.1, 0.3]
    for variable in heads.models[3].trainable_variables:
        variable.assign(variable + 1.0)
    heads.take(3, copy_weights=True)
    for mine, chosen in zip(classifier.head.variables, heads.models[3].variables):
        np.testing.assert_array_equal(mine.numpy(), chosen.numpy())
    assert (heads.chosen, heads.label_smoothing) == (3, 0.3)
    assert classifier.head.get_layer("dropout").rate == 0
    assert not heads.sweeping(schedule.head)
