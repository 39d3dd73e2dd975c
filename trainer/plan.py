"""What the job will do, in words: the strategy line every run prints, and the whole plan that
--dry_run prints instead of training."""

from trainer import model
from trainer import sources
from trainer import sweep


def strategy_line(kind, reason, schedule, execution):
    return (f"strategy {kind} ({reason}): {schedule.replicas} replica(s); global batch "
            f"{schedule.global_batch}, {schedule.per_replica_batch} per replica; "
            f"{schedule.steps_per_epoch} steps per epoch; {execution.policy}, "
            f"{execution.steps_per_execution} step(s) per execution, "
            f"jit_compile {execution.jit_compile}")


def describe(config, schedule, strategy, source, layout, state, trainable_params, inputs):
    """The plan as text. strategy is strategy_line()'s; trainable_params maps phase name to
    trainable parameter count; inputs, phase name to phase_data.Inputs."""
    head_settings = config.head_settings()
    lines = ["plan (--dry_run: nothing is trained or written)", f"  {strategy}"]
    lines += _data_lines(source)
    for phase in schedule.phases:
        steps = (phase.end_epoch - phase.first_epoch) * schedule.steps_per_epoch
        what = ("backbone frozen" if phase.name == "head" else
                f"backbone layers {model.fine_tune_layer(config.backbone, config.fine_tune_at)}+ "
                "trainable")
        rates = {point["learning_rate"] for point in head_settings}
        rate = (f"lr {phase.learning_rate:g}" if phase.name != "head" or len(rates) == 1
                else "each head's lr")
        lines.append(f"  phase {phase.name:<10}epochs {phase.first_epoch + 1}-{phase.end_epoch} at "
                     f"{rate}, {what}: {schedule.steps_per_epoch} steps/epoch, "
                     f"{steps} steps, {trainable_params[phase.name]:,} trainable parameters")
        lines.append(f"    trains on {inputs[phase.name].description}")
        if phase.name == "head" and len(head_settings) > 1:
            lines += sweep.plan(head_settings)
    lines.append(f"  weights       {config.backbone}: {config.base_weights}")
    warning = model.random_frozen_backbone(config)
    if warning:
        lines.append(f"  warning       {warning}")
    lines.append(f"  model_dir     {layout.model_dir} ({state})")
    lines.append(f"  outputs       config.yaml, labels.txt, metrics.json, report.png, export/"
                 f"{', model.tflite' if config.export_tflite else ''} in the model_dir")
    lines.append(f"  checkpoints   {layout.checkpoint_dir}")
    lines.append(f"  TensorBoard   {layout.log_dir}")
    return "\n".join(lines)


def _data_lines(source):
    """The data section: classes with their counts in each split, skipped files, imbalance."""
    lines = [f"  data          {source.root}: {len(source.class_names)} classes, validation "
             f"from {source.validation_source}"]
    width = max(len(name) for name in source.class_names) + 2
    lines.append(f"    {'class':<{width}}{'train':>8}{'validation':>12}")
    counts = [split.class_counts(len(source.class_names))
              for split in (source.train, source.validation)]
    for name, train, validation in zip(source.class_names, *counts):
        lines.append(f"    {name:<{width}}{train:>8}{validation:>12}")
    lines.append(f"    {'total':<{width}}{len(source.train):>8}{len(source.validation):>12}")
    if source.checked:
        lines.append(f"  unreadable    {len(source.skipped)} file(s) skipped"
                     + "".join(f"\n    {path}: {source.skip_reasons.get(path, 'skipped')}"
                               for path in source.skipped[:10]))
    else:
        lines.append("  unreadable    found when the job first reads the images (the plan "
                     "reads none); left out then, and listed in metrics.json")
    warning = sources.imbalance(source.train, source.class_names)
    if warning:
        lines.append(f"  warning       {warning}")
    return lines
