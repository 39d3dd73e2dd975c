"""The compiled training step and the evaluation: what runs on the devices, under strategy.run.

Owns the loss and the (loss, correct, count) sums of each model trained or evaluated. It is
handed an iterator or a dataset of (inputs, labels, weights) batches and the models to run;
it knows nothing of epochs, checkpoints, signals or where the batches come from.
"""

import collections

import keras
import numpy as np
import tensorflow as tf

# One model a training step trains: on cached inputs the head or the top alone, with the same
# variables, loss and optimizer as the whole model.
Learner = collections.namedtuple("Learner", "model variables optimizer label_smoothing")


def train_function(strategy, learners, global_batch, class_weights, jit_compile):
    """A function train_steps(iterator, steps, stop) running `steps` training steps; returns the
    summed (loss, correct, count) of each learner, and stop > 0 if any worker was asked to
    stop."""

    def replica_step(inputs, labels, weights, stop):
        sums = []
        for model, variables, optimizer, smoothing in learners:
            with tf.GradientTape() as tape:
                logits = model(inputs, training=True)
                per_example = loss(labels, logits, smoothing)
                loss_weights = weights * tf.gather(class_weights, labels)
                total = tf.reduce_sum(per_example * loss_weights) / global_batch
                if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                    total = optimizer.scale_loss(total)
            gradients = tape.gradient(total, variables)
            optimizer.apply_gradients(zip(gradients, variables))
            sums.append(tf.stack(_sums(labels, logits, per_example, weights)))
        # Every worker learns at this same step whether any of them was told to stop.
        stop_anywhere = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.identity(stop))
        return tf.stack(sums), stop_anywhere

    if jit_compile:
        replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def train_steps(iterator, steps, stop):
        totals, stops = tf.zeros([len(learners), 3]), tf.zeros([])
        for _ in tf.range(steps):
            sums, stop_anywhere = [
                strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for value in strategy.run(replica_step, args=next(iterator) + (stop,))]
            totals += sums
            stops += stop_anywhere
        return totals, stops

    return train_steps


def evaluation(strategy, models, dataset, steps):
    """A function computing the (loss, accuracy) of each model over `steps` batches of
    `dataset`, a validation split with each example once (padding weighs 0). The loss is the
    plain cross-entropy, whatever the label smoothing."""

    def replica_step(inputs, labels, weights):
        return tf.stack([tf.stack(_sums(labels, logits, loss(labels, logits), weights))
                         for logits in (model(inputs, training=False) for model in models)])

    @tf.function
    def eval_step(iterator):
        return strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(replica_step, args=next(iterator)), axis=None)

    def evaluate():
        iterator = iter(dataset)
        totals = np.zeros((len(models), 3))
        for _ in range(steps):
            totals += eval_step(iterator).numpy()
        return [(loss / count, correct / count) for loss, correct, count in totals.tolist()]

    return evaluate


def loss(labels, logits, label_smoothing=0.0):
    """Cross-entropy of each example; with label smoothing, against targets of
    1 - smoothing + smoothing / classes for the label, smoothing / classes elsewhere."""
    if not label_smoothing:
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    targets = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    return keras.losses.categorical_crossentropy(targets, logits, from_logits=True,
                                                 label_smoothing=label_smoothing)


def _sums(labels, logits, per_example, weights):
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                      tf.float32)
    return (tf.reduce_sum(per_example * weights), tf.reduce_sum(correct * weights),
            tf.reduce_sum(weights))
