"""--head_sweep: heads trained side by side in phase 1, each as its own run would train it."""

import numpy as np
import pytest

from tests.test_train import tiny_trainer
from trainer import config as config_lib
from trainer import sweep

# Two learning rates, with dropout (masks matter) and two label smoothings: 4 heads.
GRID = "learning_rate=1e-2,1e-3;label_smoothing=0,0.2"
SETTINGS = dict(epochs=2, fine_tune_epochs=1, dropout=0.5)


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
    assert len(heads) == len(points) == 4
    alone = [_run(tmp_path / f"alone{index}", phases=("head",), learning_rate=point[
        "learning_rate"], label_smoothing=point["label_smoothing"])[0]
        for index, point in enumerate(points)]
    for head, own in zip(heads, alone):
        assert _curves(head) == _curves(own)
    assert chosen == sweep.choose(alone)
    # Phase 2 goes on from the chosen head, with its settings: the run of those settings.
    best = points[chosen]
    whole = _run(tmp_path / "best", learning_rate=best["learning_rate"],
                 label_smoothing=best["label_smoothing"])
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
