"""The compiled training step and the evaluation (trainer/steps.py), on a one-layer model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import steps


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def _batches(inputs, labels, weights, batch):
    dataset = tf.data.Dataset.from_tensor_slices((inputs.astype(np.float32),
                                                  labels.astype(np.int32),
                                                  weights.astype(np.float32)))
    return dataset.batch(batch)


def _learner(model, learning_rate=0.1, smoothing=0.0):
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(model.trainable_variables)
    return steps.Learner(model, model.trainable_variables, optimizer, smoothing)


RNG = np.random.default_rng(0)
INPUTS, LABELS = RNG.normal(size=(8, 3)), RNG.integers(0, 2, size=8)


def test_the_step_sums_loss_correct_and_count_with_padding_weighing_nothing():
    strategy = tf.distribute.get_strategy()
    model = _model()
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 0])  # the last two repeat earlier examples
    logits = model(INPUTS.astype(np.float32)).numpy()
    expected_loss = steps.loss(LABELS, logits).numpy()
    expected_correct = (logits.argmax(-1) == LABELS)
    train_steps = steps.train_function(strategy, [_learner(model, learning_rate=0.0)], 8,
                                       tf.ones([2]), jit_compile=False)
    sums, stop = train_steps(iter(_batches(INPUTS, LABELS, weights, 8)), tf.constant(1),
                             tf.constant(0.0))
    np.testing.assert_allclose(sums.numpy()[0], [(expected_loss * weights).sum(),
                                                 (expected_correct * weights).sum(), 6],
                               rtol=1e-5)
    assert float(stop) == 0


def test_a_stop_asked_anywhere_comes_back_from_the_step():
    train_steps = steps.train_function(tf.distribute.get_strategy(), [_learner(_model())], 4,
                                       tf.ones([2]), jit_compile=False)
    _, stop = train_steps(iter(_batches(INPUTS, LABELS, np.ones(8), 4)), tf.constant(2),
                          tf.constant(1.0))
    assert float(stop) > 0


def test_every_learner_trains_on_the_same_batches_as_alone():
    """Two learners in one step move each as a step of its own would."""
    batches = _batches(INPUTS, LABELS, np.ones(8), 4)
    together = [_model(), _model()]
    learners = [_learner(together[0], 0.1), _learner(together[1], 0.01, smoothing=0.2)]
    steps.train_function(tf.distribute.get_strategy(), learners, 4, tf.ones([2]),
                         False)(iter(batches), tf.constant(2), tf.constant(0.0))
    for model, (rate, smoothing) in zip(together, [(0.1, 0.0), (0.01, 0.2)]):
        alone = _model()
        steps.train_function(tf.distribute.get_strategy(), [_learner(alone, rate, smoothing)],
                             4, tf.ones([2]), False)(iter(batches), tf.constant(2),
                                                     tf.constant(0.0))
        for mine, theirs in zip(model.weights, alone.weights):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_label_smoothing_moves_the_targets_toward_uniform():
    logits = tf.constant([[2.0, 0.0]])
    smoothed = steps.loss(tf.constant([0]), logits, 0.2).numpy()[0]
    probabilities = tf.nn.softmax(logits).numpy()[0]
    assert smoothed == pytest.approx(-(0.9 * np.log(probabilities[0])
                                       + 0.1 * np.log(probabilities[1])), rel=1e-5)
    assert steps.loss(tf.constant([0]), logits).numpy()[0] == pytest.approx(
        -np.log(probabilities[0]), rel=1e-5)


def test_evaluation_counts_each_example_once_for_every_model():
    models = [_model(0), _model(1)]
    weights = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    evaluate = steps.evaluation(tf.distribute.get_strategy(), models,
                                _batches(INPUTS, LABELS, weights, 4), steps=2)
    results = evaluate()
    assert results == evaluate()  # a new pass each call
    for model, (loss, accuracy) in zip(models, results):
        logits = model(INPUTS[:5].astype(np.float32)).numpy()
        assert loss == pytest.approx(steps.loss(LABELS[:5], logits).numpy().mean(), rel=1e-5)
        assert accuracy == pytest.approx((logits.argmax(-1) == LABELS[:5]).mean())


@pytest.mark.parametrize("class_weights, moved", [([1.0, 0.0], False), ([1.0, 1.0], True)])
def test_class_weights_weigh_each_examples_gradient(class_weights, moved):
    """A batch of class 1 alone: a weight of 0 for it leaves the model where it was."""
    model = _model()
    before = [weight.numpy() for weight in model.weights]
    steps.train_function(tf.distribute.get_strategy(), [_learner(model)], 8,
                         tf.constant(class_weights), False)(
        iter(_batches(INPUTS, np.ones(8), np.ones(8), 8)), tf.constant(1), tf.constant(0.0))
    changed = any(not np.array_equal(old, new.numpy()) for old, new in zip(before, model.weights))
    assert changed is moved
