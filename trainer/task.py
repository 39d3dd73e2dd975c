"""python -m trainer.task: the transfer-learning recipe as a job.

flags -> config -> strategy -> data -> model -> train the head -> fine-tune -> export.
"""

import os
import sys
import time

from absl import flags
from absl import logging
import keras
import tensorflow as tf

from trainer import config as config_lib
from trainer import export
from trainer import model
from trainer import outputs
from trainer import plan
from trainer import report
from trainer import sources
from trainer import strategy as strategy_lib
from trainer import train
from trainer.cli import run_main

FLAGS = flags.FLAGS
config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)  # so that --help lists them, not only --helpfull

# Exit status of a job stopped by SIGTERM after checkpointing: not done, run it again.
PREEMPTED_EXIT_CODE = 42


def main(argv):
    del argv
    began = time.time()
    tf.get_logger().setLevel("ERROR")
    config = config_lib.resolve(FLAGS)
    layout = outputs.Layout.of(config.model_dir)
    state = outputs.check(layout, config, FLAGS.overwrite)
    if state == "complete" and not FLAGS.dry_run:
        print(f"run in {config.model_dir} is already complete; nothing to do "
              "(use --overwrite to train again)")
        return

    strategy, kind, reason = _create_strategy(config)
    source = sources.scan(config_lib.data_root(config.data), config.validation_split,
                          config.seed, config.tfds_options())
    schedule = train.Schedule.of(config, len(source.train), strategy.num_replicas_in_sync)
    execution = strategy_lib.execution(kind, config.mixed_precision, config.steps_per_execution,
                                       config.jit_compile, schedule.steps_per_epoch)
    strategy_line = plan.strategy_line(kind, reason, schedule, execution)
    keras.mixed_precision.set_global_policy(execution.policy)
    keras.utils.set_random_seed(config.seed)
    if FLAGS.dry_run:
        print(_dry_run_plan(config, schedule, strategy_line, source, layout, state))
        return
    if state == "overwrite":
        outputs.wipe(layout)
    print(sources.describe(source), flush=True)
    print(strategy_line, flush=True)
    imbalance = sources.imbalance(source.train, source.class_names)
    if imbalance and config.class_weight != "auto":
        logging.warning(imbalance)

    with strategy.scope():
        classifier = model.build(config.backbone, config.base_weights, config.image_size,
                                 len(source.class_names), config.dropout, config.augmentations())
    chief = strategy_lib.is_chief(strategy)
    with train.Trainer(config, strategy, schedule, execution, classifier, source,
                       layout.checkpoint_dir, layout.log_dir, chief) as trainer:
        resumed_step = _restore(trainer, layout, config, source.class_names, chief)
        try:
            trainer.fit(schedule.head)       # phase 1: a new head on the frozen backbone
            trainer.fit(schedule.fine_tune)  # phase 2: the top of the backbone too, lower rate
        except train.Preempted as stopped:
            print(f"stopped by SIGTERM at step {stopped}: checkpoint saved; run the same "
                  "command to resume", flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
        evaluation = _evaluate_and_export(trainer, classifier, source, config, layout, chief)
    if chief:
        _write_report(trainer, classifier, evaluation, config, layout, resumed_step, began)


def _create_strategy(config):
    """The strategy first, before other TensorFlow work: multi-worker collectives and TPU
    initialisation must come first in the process."""
    kind, reason = strategy_lib.pick(config.strategy, config.tpu)
    strategy_lib.check_paths_reachable(kind, config.tpu, {"data": config.data,
                                                          "model_dir": config.model_dir})
    strategy, _, _ = strategy_lib.create(kind, config.tpu)
    return strategy, kind, reason


def _dry_run_plan(config, schedule, strategy_line, source, layout, state):
    # Parameter counts do not depend on the weights: build without downloading any.
    classifier = model.build(config.backbone, "none", config.image_size,
                             len(source.class_names), config.dropout)
    counts = model.trainable_parameters(
        classifier, model.fine_tune_layer(config.backbone, config.fine_tune_at))
    return plan.describe(config, schedule, strategy_line, source, layout, state, counts)


def _restore(trainer, layout, config, class_names, chief):
    """Resumes from the latest checkpoint, if any, and records the run's config; returns the
    step resumed from, or None."""
    resumed_step = trainer.restore()
    if resumed_step is not None:
        print(f"resuming from epoch {resumed_step // trainer.schedule.steps_per_epoch} "
              f"(step {resumed_step} of {trainer.schedule.total_steps})", flush=True)
    if chief:
        outputs.write_start(layout, config, class_names)
    return resumed_step


def _evaluate_and_export(trainer, classifier, source, config, layout, chief):
    """The validation report's metrics and the SavedModel. Every worker takes part in both;
    only the chief's results are kept."""
    evaluation = report.evaluation_metrics(trainer.predict_validation(),
                                           source.validation.labels, source.validation.paths,
                                           source.class_names)
    export.export(classifier.inference, source.class_names, config.image_size,
                  layout.export_dir if chief else os.path.join(trainer.scratch, "export"))
    return evaluation


def _write_report(trainer, classifier, evaluation, config, layout, resumed_step, began):
    """The chief's outputs besides the export: model.tflite, report.png, metrics.json, the
    tuning metric, and the closing line."""
    if config.export_tflite:
        export.export_tflite(classifier.inference, config.image_size, layout.path("model.tflite"))
    history, source = trainer.history, trainer.source
    report.plot(history, evaluation["confusion_matrix"], source.class_names,
                layout.path("report.png"))
    final = history[-1]
    resumed_epoch = None if resumed_step is None else (
        resumed_step // trainer.schedule.steps_per_epoch)
    outputs.write_metrics(layout, {
        "status": "complete",
        "val_accuracy": final["val_accuracy"],
        "val_loss": final["val_loss"],
        "history": history,
        "epochs_completed": len(history),
        "skipped_images": len(source.skipped),
        "skipped_examples": source.skipped[:10],
        "resumed_from_epoch": resumed_epoch,
        "resumed_from_step": resumed_step,
        "train_images": len(source.train),
        "val_images": len(source.validation),
        "global_steps": trainer.schedule.total_steps,
        "replicas": trainer.schedule.replicas,
        "phase_seconds": trainer.phase_seconds,
        "cached_features": trainer.caches_features,
        **evaluation,
        "wall_seconds": round(time.time() - began, 1),
    })
    outputs.report_to_hyperparameter_tuning(final["val_accuracy"], trainer.schedule.total_steps)
    print(f"validation accuracy {final['val_accuracy']:.4f}; outputs in {config.model_dir} "
          f"(model: {layout.export_dir}; report: {layout.path('report.png')})", flush=True)


if __name__ == "__main__":
    run_main(main)
