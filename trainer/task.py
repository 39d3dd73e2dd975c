"""python -m trainer.task: the transfer-learning recipe as a job.

flags -> config -> strategy -> data -> model -> train the head -> fine-tune -> export.
"""

import dataclasses
import os
import signal
import sys
import time

from absl import flags
from absl import logging

from trainer import config as config_lib
from trainer import errors
from trainer import lease
from trainer.cli import loading_tensorflow, run_main
from trainer.errors import Stopped

FLAGS = flags.FLAGS
config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)  # so that --help lists them, not only --helpfull

# The oldest TensorFlow the trainer is tested with (CI's compatibility pass): that of the TPU
# image, tensorflow-tpu 2.20.
OLDEST_TESTED_TENSORFLOW = (2, 20)

# Exit status of a job stopped after saving its work: by SIGTERM (a preemption; run it again),
# or by Ctrl-C (the shell's 128 + SIGINT).
STOPPED_EXIT_CODES = {"SIGTERM": 42, "SIGINT": 128 + signal.SIGINT}


def main(argv):
    check_no_arguments(argv)
    config = config_lib.resolve(FLAGS)
    try:
        run(config, FLAGS.overwrite, FLAGS.dry_run)
        return
    except Stopped as stopped:
        line, code = stopped.line("run the same command"), STOPPED_EXIT_CODES[stopped.signal]
    errors.exit_with(sys.stdout, line, code)


def run(config, overwrite=False, dry_run=False):
    """The job on a resolved config (what the CLI and trainer.fit run). Returns the plan when
    dry_run; raises Stopped when a signal stopped it after saving its work."""
    began = time.time()
    # The stages load TensorFlow (seconds): imported once the flags are known to be good, so
    # that --help and a wrong flag answer at once.
    with loading_tensorflow():
        import tensorflow as tf
        from trainer import files, model, outputs, train
    tf.get_logger().setLevel("ERROR")
    model.check(config.backbone, config.image_size, config.base_weights)
    if config.feature_cache:
        files.check_reachable(config.feature_cache)
    layout = outputs.Layout.of(config.model_dir)
    state = outputs.check(layout, config, overwrite)
    if state == "complete" and not dry_run:
        print(f"run in {config.model_dir} is already complete; nothing to do "
              "(use --overwrite to train again)")
        return None

    run = _set_up(config)
    if dry_run:
        plan = _dry_run_plan(config, run, layout, state)
        print(plan)
        return plan
    _announce(config, run)
    with errors.from_tensorflow(config.data, run.kind == "multiworker"):
        # Before anything is written: a model that cannot be built leaves no folder behind.
        with run.strategy.scope():
            classifier = model.build(config.backbone, config.base_weights, config.image_size,
                                     len(run.source.class_names), config.dropout,
                                     config.augmentations())
        fine_tune_at = model.fine_tune_layer(config.backbone, config.fine_tune_at)
        if config.fine_tune_epochs:
            model.check_fine_tune_at(classifier.backbone, fine_tune_at)
        outputs.ensure_writable(layout)
        with lease.held(config.model_dir, run.chief):
            if state == "overwrite" and run.chief:
                outputs.wipe(layout)
            _record_start(config, run, layout, state)
            stop = train.StopSignals()
            data = _read_images_once(config, run, classifier, fine_tune_at, layout, stop)
            run = _with_source(config, run, data.source)
            _train(config, run, classifier, data, stop, layout, began)
    return None


def _read_images_once(config, run, classifier, fine_tune_at, layout, stop):
    """The pass before training (caching.py), stoppable by a signal: a phase_data.PhaseData."""
    from trainer import phase_data, train
    multiworker = run.kind == "multiworker"
    starting = train.starting_phase(run.schedule, layout.checkpoint_dir)
    with stop.caught():
        return phase_data.read_images_once(
            config, run.strategy, run.execution.policy, run.source, classifier, fine_tune_at,
            layout.cache_dir, run.chief, lambda: stop.between_batches(multiworker), starting)


def _train(config, run, classifier, data, stop, layout, began):
    """Both phases, then the evaluation, the export and the report."""
    from trainer import files, train
    with train.Trainer(config, run.strategy, run.schedule, run.execution, classifier, data,
                       stop, layout.checkpoint_dir, layout.log_dir, run.chief) as trainer:
        resumed_step = trainer.restore()
        if resumed_step is not None:
            print(resume_line(resumed_step, trainer.schedule), flush=True)
        trainer.fit(run.schedule.head)       # phase 1: a new head, backbone frozen
        trainer.fit(run.schedule.fine_tune)  # phase 2: the top of the backbone too
        evaluation = _evaluate_and_export(trainer, config, layout, run.chief)
        if run.chief:
            _write_report(trainer, evaluation, config, layout, resumed_step, began)
            # What the pass kept in --model_dir served resuming only; the run is complete.
            files.remove_tree(layout.cache_dir)


def check_no_arguments(argv):
    """absl hands back what is not a flag; a job would ignore it, so `epochs=3` for
    `--epochs=3` would train with the default unnoticed."""
    if len(argv) > 1:
        raise errors.UserError(f"unexpected argument {argv[1]!r}: give flags as --name=value "
                               "(see --helpfull)")


@dataclasses.dataclass
class _Run:
    """What the job runs on: decided before any training, shown by --dry_run."""
    strategy: object
    kind: str           # the strategy's name, 'auto' resolved
    chief: bool         # this process writes the outputs
    source: object      # sources.Source
    schedule: object    # train.Schedule
    execution: object   # strategy.Execution
    reason: str         # why this strategy
    strategy_line: str = ""


def _set_up(config):
    """The strategy first, before other TensorFlow work (multi-worker collectives and TPU
    initialisation must come first in the process), then the data, then what follows."""
    import keras
    from trainer import sources, strategy as strategy_lib
    kind, reason = strategy_lib.pick(config.strategy, config.tpu)
    strategy_lib.check_paths_reachable(kind, config.tpu, {"data": config.data,
                                                          "model_dir": config.model_dir})
    strategy, _, _ = strategy_lib.create(kind, config.tpu)
    source = sources.scan(config_lib.data_root(config.data), config.validation_split,
                          config.seed, config.tfds_options())
    run = _with_source(config, _Run(strategy, kind, strategy_lib.is_chief(strategy), None,
                                    None, None, reason), source)
    keras.mixed_precision.set_global_policy(run.execution.policy)
    keras.utils.set_random_seed(config.seed)
    return run


def _with_source(config, run, source):
    """The run on `source`: as listed, then as checked by the pass over the images, which may
    leave out images and so change the steps of an epoch."""
    from trainer import plan, strategy as strategy_lib, train
    schedule = train.Schedule.of(config, len(source.train), run.strategy.num_replicas_in_sync)
    execution = strategy_lib.execution(run.kind, config.mixed_precision,
                                       config.steps_per_execution, config.jit_compile,
                                       schedule.steps_per_epoch)
    return dataclasses.replace(run, source=source, schedule=schedule, execution=execution,
                               strategy_line=plan.strategy_line(run.kind, run.reason, schedule,
                                                                execution))


def _announce(config, run):
    import keras
    import tensorflow as tf
    from trainer import model, sources
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}", flush=True)
    if tuple(int(part) for part in tf.__version__.split(".")[:2]) < OLDEST_TESTED_TENSORFLOW:
        logging.warning("TensorFlow %s is older than %s, the oldest this trainer is tested with: "
                        "if something fails, try a newer one (our images pin theirs)",
                        tf.__version__, ".".join(map(str, OLDEST_TESTED_TENSORFLOW)))
    print(sources.describe(run.source), flush=True)
    print(run.strategy_line, flush=True)
    imbalance = sources.imbalance(run.source.train, run.source.class_names)
    if imbalance and config.class_weight != "auto":
        logging.warning(imbalance)
    random_backbone = model.random_frozen_backbone(config)
    if random_backbone:
        logging.warning(random_backbone)


def _dry_run_plan(config, run, layout, state):
    from trainer import model, phase_data, plan
    # Parameter counts and the cut do not depend on the weights: build without any.
    classifier = model.build(config.backbone, "none", config.image_size,
                             len(run.source.class_names), config.dropout)
    fine_tune_at = model.fine_tune_layer(config.backbone, config.fine_tune_at)
    counts = model.trainable_parameters(classifier, fine_tune_at)
    inputs = phase_data.phase_inputs(config, phase_data.fine_tune_cut(config, classifier,
                                                                        fine_tune_at))
    return plan.describe(config, run.schedule, run.strategy_line, run.source, layout, state,
                         counts, inputs)


def _record_start(config, run, layout, state):
    """A run resumes only on the data it started with (outputs.check_same_data); a new one
    records its config and data. Before the pass over the images, which may be long."""
    from trainer import outputs
    record = outputs.data_record(run.source)
    if state == "resume":
        outputs.check_same_data(layout, record, config.data)
    if run.chief:
        outputs.write_start(layout, config, run.source.class_names, record)


def resume_line(step, schedule):
    """Where a resumed run goes on: the epoch it continues, and how far into it."""
    total = schedule.total_steps
    if step >= total:
        return f"resuming at step {step} of {total}: training is done; evaluating and exporting"
    epoch, done = divmod(step, schedule.steps_per_epoch)
    into = f"{done} of its {schedule.steps_per_epoch} steps done" if done else "from its start"
    return (f"resuming at step {step} of {total}: epoch {epoch + 1}/"
            f"{schedule.fine_tune.end_epoch}, {into}")


def _evaluate_and_export(trainer, config, layout, chief):
    """The validation report's metrics and the SavedModel. Every worker takes part in both;
    only the chief's results are kept."""
    from trainer import export, report
    classifier, source = trainer.classifier, trainer.source
    print(f"predicting the {len(source.validation)} validation images for the report",
          flush=True)
    evaluation = report.evaluation_metrics(trainer.predict_validation(),
                                           source.validation.labels, source.validation.paths,
                                           source.class_names)
    if chief:
        print(f"exporting the SavedModel to {layout.export_dir}", flush=True)
    export.export(classifier.inference, source.class_names, config.image_size,
                  layout.export_dir if chief else os.path.join(trainer.scratch, "export"))
    return evaluation


def _write_report(trainer, evaluation, config, layout, resumed_step, began):
    """The chief's outputs besides the export: model.tflite, report.png, metrics.json, the
    tuning metric, and the closing line."""
    from trainer import export, outputs, report, sweep
    print("writing report.png and metrics.json", flush=True)
    if config.export_tflite:
        export.export_tflite(trainer.classifier.inference, config.image_size,
                             layout.path("model.tflite"))
    history, source = trainer.history, trainer.source
    head_sweep = None
    if len(trainer.head_settings) > 1:
        head_sweep = sweep.summary(trainer.head_settings, trainer.head_histories, trainer.chosen)
    report.plot(history, evaluation["confusion_matrix"], source.class_names,
                layout.path("report.png"), head_sweep)
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
        "pass_seconds": trainer.data.pass_seconds,
        "cached_features": [phase.name for phase in trainer.schedule.phases
                            if trainer.data.inputs[phase.name].cached],
        "cache_bytes_per_image": trainer.data.cache_bytes_per_image,
        "head_sweep": head_sweep,
        **evaluation,
        "wall_seconds": round(time.time() - began, 1),
    })
    outputs.report_to_hyperparameter_tuning(final["val_accuracy"], trainer.schedule.total_steps)
    print(f"validation accuracy {final['val_accuracy']:.4f}; outputs in {config.model_dir} "
          f"(model: {layout.export_dir}; report: {layout.path('report.png')})", flush=True)


if __name__ == "__main__":
    run_main(main)
