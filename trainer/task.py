"""python -m trainer.task: the transfer-learning recipe as a job.

flags -> config -> strategy -> data -> model -> train the head -> fine-tune -> export.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import data  # noqa: E402
from trainer import export  # noqa: E402
from trainer import model  # noqa: E402
from trainer import outputs  # noqa: E402
from trainer import plan  # noqa: E402
from trainer import report  # noqa: E402
from trainer import strategy as strategy_lib  # noqa: E402
from trainer import train  # noqa: E402
from trainer.cli import run_main  # noqa: E402
from trainer.errors import UserError, op_reason  # noqa: E402

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
    state = outputs.check(layout, config, FLAGS.overwrite and not FLAGS.dry_run)
    if state == "complete" and not FLAGS.dry_run:
        print(f"run in {config.model_dir} is already complete; nothing to do "
              "(use --overwrite to train again)")
        return

    kind, _ = strategy_lib.pick(config.strategy, config.tpu)
    strategy_lib.check_paths_reachable(kind, config.tpu, {"data": config.data,
                                                          "model_dir": config.model_dir})
    strategy, kind, reason = strategy_lib.create(config.strategy, config.tpu)
    chief = strategy_lib.is_chief(strategy)

    folder = data.scan(config.data, config.validation_split, config.seed, config.tfds_options())
    steps_per_epoch = data.steps_per_epoch(len(folder.train), config.batch_size)
    execution = strategy_lib.execution(kind, config.mixed_precision, config.steps_per_execution,
                                       config.jit_compile, steps_per_epoch)
    strategy_line = (
        f"strategy {kind} ({reason}): {strategy.num_replicas_in_sync} replica(s); global batch "
        f"{config.batch_size}, {config.batch_size // strategy.num_replicas_in_sync} per replica; "
        f"{steps_per_epoch} steps per epoch; {execution.policy}, "
        f"{execution.steps_per_execution} step(s) per execution, "
        f"jit_compile {execution.jit_compile}")
    keras.mixed_precision.set_global_policy(execution.policy)
    keras.utils.set_random_seed(config.seed)

    if FLAGS.dry_run:
        # Parameter counts do not depend on the weights: build without downloading any.
        classifier = model.build(config.backbone, "none", config.image_size,
                                 len(folder.class_names), config.dropout)
        counts = model.trainable_parameters(
            classifier, model.fine_tune_layer(config.backbone, config.fine_tune_at))
        print(plan.describe(config, strategy_line, folder, layout, state, counts))
        return

    print(data.describe(folder), flush=True)
    print(strategy_line, flush=True)
    imbalance = data.imbalance(folder.train, folder.class_names)
    if imbalance and config.class_weight != "auto":
        logging.warning(imbalance)

    with strategy.scope():
        classifier = model.build(config.backbone, config.base_weights, config.image_size,
                                 len(folder.class_names), config.dropout, config.augmentations())
    trainer = train.Trainer(config, strategy, execution, classifier, folder,
                            layout.checkpoint_dir, layout.log_dir, chief)
    resumed_step = trainer.restore()
    if resumed_step is not None:
        print(f"resuming from epoch {resumed_step // steps_per_epoch} "
              f"(step {resumed_step} of {trainer.total_steps})", flush=True)
    if chief:
        outputs.write_start(layout, config, folder.class_names)

    try:
        history = trainer.fit()  # phase 1, the head, then phase 2, fine-tuning
    except train.Preempted as stopped:
        trainer.close()
        print(f"stopped by SIGTERM at step {stopped}: checkpoint saved; run the same command "
              "to resume", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except tf.errors.DataLossError as error:
        raise UserError(f"cannot read the data in --data={config.data}: "
                        f"{op_reason(error)}; the files are damaged: prepare "
                        "or copy them again, then run the same command to resume from the last "
                        "checkpoint") from None
    except (tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.CancelledError, tf.errors.DeadlineExceededError) as error:
        if kind != "multiworker":
            raise
        raise UserError(f"another worker stopped ({op_reason(error)}); "
                        "restart all workers with the same command to resume from the last "
                        "checkpoint") from None

    # Every worker takes part in predicting and exporting; only the chief's results are kept.
    evaluation = report.evaluation_metrics(trainer.predict_validation(),
                                           folder.validation.labels, folder.validation.paths,
                                           folder.class_names)
    export.export(classifier.inference, folder.class_names, config.image_size,
                  layout.export_dir if chief else os.path.join(trainer.scratch, "export"))
    trainer.close()
    if not chief:
        return
    if config.export_tflite:
        export.export_tflite(classifier.inference, config.image_size, layout.path("model.tflite"))
    report.plot(history, evaluation["confusion_matrix"], folder.class_names,
                layout.path("report.png"))
    final = history[-1]
    outputs.write_metrics(layout, {
        "status": "complete",
        "val_accuracy": final["val_accuracy"],
        "val_loss": final["val_loss"],
        "history": history,
        "epochs_completed": len(history),
        "skipped_images": len(folder.skipped),
        "skipped_examples": folder.skipped[:10],
        "resumed_from_epoch": None if resumed_step is None else resumed_step // steps_per_epoch,
        "resumed_from_step": resumed_step,
        "train_images": len(folder.train),
        "val_images": len(folder.validation),
        "global_steps": trainer.total_steps,
        "replicas": strategy.num_replicas_in_sync,
        "phase_seconds": trainer.phase_seconds,
        "cached_features": trainer.caches_features,
        **evaluation,
        "wall_seconds": round(time.time() - began, 1),
    })
    outputs.report_to_hyperparameter_tuning(final["val_accuracy"], trainer.total_steps)
    print(f"validation accuracy {final['val_accuracy']:.4f}; outputs in {config.model_dir} "
          f"(model: {layout.export_dir}; report: {layout.path('report.png')})", flush=True)


if __name__ == "__main__":
    run_main(main)
