"""--dry_run: what the job would do, worked out without training or writing anything."""

import numpy as np

from trainer import data
from trainer import model
from trainer import train


def describe(config, strategy_line, folder, layout, state, trainable_params):
    """The plan as text. trainable_params maps phase name to trainable parameter count."""
    steps_per_epoch = data.steps_per_epoch(len(folder.train), config.batch_size)
    lines = ["plan (--dry_run: nothing is trained or written)", f"  {strategy_line}"]
    lines.append(f"  data          {folder.root}: {len(folder.class_names)} classes, validation "
                 f"from {folder.validation_source}")
    width = max(len(name) for name in folder.class_names) + 2
    lines.append(f"    {'class':<{width}}{'train':>8}{'validation':>12}")
    for label, name in enumerate(folder.class_names):
        lines.append(f"    {name:<{width}}{int(np.sum(folder.train.labels == label)):>8}"
                     f"{int(np.sum(folder.validation.labels == label)):>12}")
    lines.append(f"    {'total':<{width}}{len(folder.train):>8}{len(folder.validation):>12}")
    lines.append(f"  unreadable    {len(folder.skipped)} file(s) skipped"
                 + "".join(f"\n    {path}" for path in folder.skipped[:10]))
    warning = data.imbalance(folder.train, folder.class_names)
    if warning:
        lines.append(f"  warning       {warning}")
    for phase in train.phases(config):
        steps = (phase.end_epoch - phase.first_epoch) * steps_per_epoch
        what = ("backbone frozen" if phase.name == "head" else
                f"backbone layers {model.fine_tune_layer(config.backbone, config.fine_tune_at)}+ "
                "trainable")
        cached = ("; features cached: one backbone pass, then the head trains on them"
                  if phase.name == "head" and config.caches_features() else "")
        lines.append(f"  phase {phase.name:<10}epochs {phase.first_epoch + 1}-{phase.end_epoch} at "
                     f"lr {phase.learning_rate:g}, {what}: {steps_per_epoch} steps/epoch, "
                     f"{steps} steps, {trainable_params[phase.name]:,} trainable parameters"
                     f"{cached}")
    lines.append(f"  weights       {config.backbone}: {config.base_weights}")
    lines.append(f"  model_dir     {layout.model_dir} ({state})")
    lines.append(f"  outputs       config.yaml, labels.txt, metrics.json, report.png, export/"
                 f"{', model.tflite' if config.export_tflite else ''} in the model_dir")
    lines.append(f"  checkpoints   {layout.checkpoint_dir}")
    lines.append(f"  TensorBoard   {layout.log_dir}")
    return "\n".join(lines)
