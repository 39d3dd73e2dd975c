"""python -m tests.programs.mirrored_two_cpus WORKDIR: trains the same tiny job, both phases on
what the backbone pass cached, under the default strategy and under MirroredStrategy over two
logical CPUs, and checks that the weights agree. A program of its own: the logical devices must be set before TensorFlow's runtime
starts, which in a test process has long happened."""

import sys

import keras
import numpy as np
import tensorflow as tf

from tests import images
from trainer import config as config_lib
from trainer import model
from trainer import phase_data
from trainer import sources
from trainer import strategy as strategy_lib
from trainer import train


def train_weights(strategy, source, config, workdir, index):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        classifier = model.build("small_cnn", "none", 32, 2, 0.0)
    stop = train.StopSignals()
    data = phase_data.read_images_once(
        config, strategy, "float32", source, classifier,
        model.fine_tune_layer(config.backbone, config.fine_tune_at),
        f"{workdir}/cache{index}", True, lambda: stop.between_batches(False))
    schedule = train.Schedule.of(config, len(data.source.train), strategy.num_replicas_in_sync)
    execution = strategy_lib.execution("cpu", "off", 1, "off", schedule.steps_per_epoch)
    with train.Trainer(config, strategy, schedule, execution, classifier, data, stop,
                       f"{workdir}/ckpt{index}", f"{workdir}/logs{index}", True) as trainer:
        trainer.fit(schedule.head)
        history = trainer.fit(schedule.fine_tune)
    print("replicas", strategy.num_replicas_in_sync, "loss", history[-1]["loss"])
    return [weight.numpy() for weight in classifier.model.weights]


def main(workdir):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    source = sources.scan(images.folder(f"{workdir}/data", per_class=8, size=32), 0.25, 0)
    config = config_lib.Config(data="x", backbone="small_cnn", base_weights="none",
                               image_size=32, batch_size=8, epochs=2, fine_tune_epochs=1,
                               learning_rate=1e-2, fine_tune_learning_rate=1e-3, dropout=0.0)
    one, two = (train_weights(strategy, source, config, workdir, index)
                for index, strategy in enumerate([
                    tf.distribute.get_strategy(),
                    tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])]))
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print("same weights")


if __name__ == "__main__":
    main(sys.argv[1])
