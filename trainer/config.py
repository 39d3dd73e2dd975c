"""The job's configuration: one dataclass, YAML presets, absl flags that override them.

Precedence, lowest first: the dataclass defaults (or the built-in smoke preset when neither
--config nor --data is given), then the YAML file named by --config, then every flag given on
the command line or in a --flagfile.
"""

import dataclasses
import difflib
import itertools
import math
import os
import typing

from absl import flags
import yaml

from trainer.errors import UserError, first_line

STRATEGIES = ("auto", "cpu", "gpu", "multiworker", "tpu")
# The backbones of model.BACKBONES with each one's default --fine_tune_at (the first layer
# phase 2 trains: MobileNetV2's 100 is the TF tutorial's), known here so that a wrong name is
# found, and the config records the layer, before TensorFlow loads.
FINE_TUNE_AT = {"mobilenet_v2": 100, "efficientnet_b0": 221, "resnet50": 143, "small_cnn": 10}
BACKBONES = tuple(FINE_TUNE_AT)
PRECISIONS = ("auto", "off", "bf16", "fp16")
SWITCHES = ("auto", "on", "off")
# Keras preprocessing layers by name; "tutorial" is the TF tutorial's flip + rotate.
AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast", "translate")
AUGMENTATION_PRESETS = {"none": (), "tutorial": ("flip", "rotate")}
# The phase-1 settings --head_sweep varies, with the values each may take.
HEAD_SETTINGS = ("learning_rate", "dropout", "label_smoothing")
MAX_HEADS = 64


def _field(default, help_text, choices=None):
    return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


@dataclasses.dataclass
class Config:
    data: str = _field("", "Dataset: an image folder ROOT with train/<class>/* (and optionally "
                       "validation/<class>/*) or a folder written by trainer.prepare, local or "
                       "gs://; tfds:NAME for TensorFlow Datasets; or 'demo', the generated demo "
                       "set.")
    tfds_data_dir: str = _field("", "Where --data=tfds:NAME is prepared (local or gs://). "
                                "Default: TFDS's own (~/tensorflow_datasets).")
    tfds_train_split: str = _field("train", "TFDS split to train on, in TFDS split syntax.")
    tfds_validation_split: str = _field("", "TFDS split to validate on (default: 'validation' "
                                        "if the dataset has one, else the last "
                                        "--validation_split of the train split).")
    tfds_download: bool = _field(False, "Let TFDS download and prepare a missing dataset "
                                 "(needs internet access).")
    model_dir: str = _field("", "Where checkpoints, logs, exports and metrics go (local or gs://). "
                            "Default: $AIP_MODEL_DIR, else ./runs/<config name>.")
    strategy: str = _field("auto", "Distribution strategy.", STRATEGIES)
    tpu: str = _field("", "TPU to use with --strategy=tpu: 'local' on a TPU VM, a name, or "
                      "grpc://host:port. Default: $TPU_NAME.")
    backbone: str = _field("mobilenet_v2", "Pretrained backbone: " + ", ".join(BACKBONES) + ".")
    base_weights: str = _field("imagenet", "Backbone weights: 'imagenet', 'none', or the path "
                               "(local or gs://) of a Keras weights file of the backbone without top.")
    image_size: int = _field(160, "Images are resized to image_size x image_size.")
    batch_size: int = _field(32, "Global batch size, summed over all replicas.")
    epochs: int = _field(10, "Epochs of phase 1: the head alone, backbone frozen.")
    fine_tune_epochs: int = _field(10, "Epochs of phase 2: top of the backbone unfrozen; 0 skips it.")
    fine_tune_at: typing.Optional[int] = _field(
        None, "Phase 2 trains backbone layers from this index upward. Default: per backbone.")
    learning_rate: float = _field(1e-4, "Adam learning rate of phase 1.")
    fine_tune_learning_rate: float = _field(1e-5, "Adam learning rate of phase 2.")
    dropout: float = _field(0.2, "Dropout rate before the classification layer.")
    label_smoothing: float = _field(0.0, "Label smoothing of the training loss (validation "
                                    "loss is the plain cross-entropy, comparable across runs).")
    head_sweep: str = _field("", "Train several heads side by side in phase 1, on the same "
                             "cached features and batches, and continue with the best by "
                             "validation accuracy: a grid over " + ", ".join(HEAD_SETTINGS) +
                             ", e.g. 'learning_rate=1e-4,3e-4,1e-3;dropout=0,0.2'. Settings "
                             "not in the grid keep their flags' values.")
    feature_cache: str = _field("", "A folder (local or gs://) where what the backbone pass "
                                "computes is kept for later jobs, keyed by the backbone, its "
                                "weights, image size, preprocessing and the data: a job or "
                                "tuning trial with the same key skips the pass. Default: none.")
    validation_split: float = _field(0.2, "Fraction of train/ held out for validation when the "
                                     "data has no validation/ folder.")
    seed: int = _field(42, "Seed for initialisation, the validation split and shuffling.")
    augment: str = _field("none", "Random augmentation during training: none, tutorial "
                          "(flip,rotate), or a comma list of " + ", ".join(AUGMENTATIONS) + ".")
    cache_features: str = _field("auto", "Compute what the frozen layers output once, in one "
                                 "backbone pass: phase 1 trains the head on the pooled "
                                 "features, phase 2 the top on the activations below "
                                 "--fine_tune_at (auto: when no augmentation).",
                                 SWITCHES)
    memory_budget_mb: int = _field(2048, "Memory for what is computed once (cached features "
                                   "and activations, decoded images); beyond it they go to "
                                   "files in the local temp dir.")
    max_image_pixels: int = _field(50_000_000, "Images with more pixels than this are skipped "
                                   "and counted, never decoded (a 20000 x 20000 image decodes "
                                   "to over a GB).")
    storage_retry_seconds: int = _field(300, "How long to keep retrying reads and writes while "
                                        "storage (gs://) fails transiently, before stopping "
                                        "with an error; checkpoints stay, rerun to resume.")
    deterministic: bool = _field(True, "Read training images in a fixed order, so that a run "
                                 "resumed mid-epoch sees exactly the batches it would have. "
                                 "--nodeterministic lets reads that finish first go first "
                                 "(for slow remote shards); a resumed epoch may then repeat or "
                                 "skip a few images.")
    class_weight: str = _field("none", "auto: weight each class's loss by total / (classes x "
                               "class count), for imbalanced data.", ("none", "auto"))
    export_tflite: bool = _field(False, "Also write model.tflite (float32 RGB 0..255 in, "
                                 "probabilities out) for on-device use.")
    checkpoint_every_steps: int = _field(0, "Also checkpoint every N training steps "
                                         "(0: at the end of each epoch only).")
    log_every_steps: int = _field(10, "Write the training loss to TensorBoard every N steps "
                                  "(0: per epoch only).")
    mixed_precision: str = _field("auto", "auto: bfloat16 on TPU, float16 with loss scaling on "
                                  "GPU, off on CPU.", PRECISIONS)
    steps_per_execution: int = _field(0, "Training steps per call into the accelerator "
                                      "(0: auto, min(50, steps per epoch) on TPU, else 1).")
    jit_compile: str = _field("auto", "XLA-compile the training step (auto: on for TPU only; "
                              "it is ~10x slower on CPU).", SWITCHES)

    def problems(self):
        """(field, message) for each value no job can run with."""
        found = []
        for field in dataclasses.fields(self):
            choices = field.metadata["choices"]
            if choices and getattr(self, field.name) not in choices:
                found.append((field.name, f"is not one of {', '.join(choices)}"))
        for name in ("learning_rate", "fine_tune_learning_rate", "dropout", "label_smoothing",
                     "validation_split"):
            if not math.isfinite(getattr(self, name)):
                found.append((name, "must be a finite number"))
        for name in ("image_size", "batch_size", "learning_rate", "fine_tune_learning_rate",
                     "max_image_pixels"):
            if getattr(self, name) <= 0:
                found.append((name, "must be positive"))
        for name in ("epochs", "fine_tune_epochs", "checkpoint_every_steps", "steps_per_execution",
                     "storage_retry_seconds", "log_every_steps"):
            if getattr(self, name) < 0:
                found.append((name, "must be 0 or more"))
        if self.epochs + self.fine_tune_epochs == 0:
            found.append(("epochs", "and fine_tune_epochs are both 0: nothing to train"))
        if not 0 <= self.validation_split < 1:
            found.append(("validation_split", "must be at least 0 and below 1"))
        for name in ("dropout", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                found.append((name, "must be in [0, 1)"))
        if not 0 <= self.seed < 2**32:
            found.append(("seed", f"must be from 0 to {2**32 - 1}"))
        if self.fine_tune_at is not None and self.fine_tune_at < 0:
            found.append(("fine_tune_at", "must be 0 or more"))
        unknown = [name for name in self.augmentations() if name not in AUGMENTATIONS]
        if unknown:
            found.append(("augment", f"names unknown augmentation(s) {unknown}: use none, "
                                     f"tutorial, or a comma list of {', '.join(AUGMENTATIONS)}"))
        elif self.cache_features == "on" and self.augmentations():
            found.append(("cache_features", "cannot be 'on' with --augment: random augmentation "
                          "changes every image each epoch, so there are no fixed features to "
                          "store; use --cache_features=auto or --augment=none"))
        if self.head_sweep:
            found += [("head_sweep", problem) for problem in self._sweep_problems()]
        return found

    def _sweep_problems(self):
        try:
            points = self.head_settings()
        except ValueError as error:
            return [str(error)]
        if len(points) > MAX_HEADS:
            return [f"has {len(points)} points; at most {MAX_HEADS} heads train side by side"]
        for point in points:
            problems = [(name, message) for name, message in
                        dataclasses.replace(self, head_sweep="", **point).problems()
                        if name in point]
            if problems:
                name, message = problems[0]
                return [f"gives {name}={point[name]!r}, which {message}"]
        why = ("--augment changes every image each epoch, so no features are fixed; use "
               "--augment=none" if self.augmentations() else
               "--cache_features=off turns them off; use --cache_features=auto"
               if self.cache_features == "off" else
               "--epochs=0 leaves phase 1 no epochs to train the heads in"
               if not self.epochs else None)
        return [f"needs the heads trained on cached features: {why}"] if why else []

    def head_settings(self):
        """The phase-1 settings of each head to train: one per point of --head_sweep's grid,
        in order (the first value of each setting first), or this config's own. Raises
        ValueError on a grid that does not parse."""
        own = {name: getattr(self, name) for name in HEAD_SETTINGS}
        if not self.head_sweep:
            return [own]
        axes = {}
        for part in filter(None, (part.strip() for part in self.head_sweep.split(";"))):
            name, equals, values = part.partition("=")
            name = name.strip()
            if not equals or name not in HEAD_SETTINGS:
                raise ValueError(f"part {part!r} is not NAME=V1,V2,... with NAME one of "
                                 f"{', '.join(HEAD_SETTINGS)}")
            if name in axes:
                raise ValueError(f"names {name} twice")
            try:
                axes[name] = [float(value) for value in values.split(",")]
            except ValueError:
                raise ValueError(f"{name}={values} is not a comma list of numbers") from None
        if not axes:
            raise ValueError("is empty: give e.g. 'learning_rate=1e-4,1e-3;dropout=0,0.2'")
        return [{**own, **dict(zip(axes, values))}
                for values in itertools.product(*axes.values())]

    def augmentations(self):
        """The augmentation layer names --augment asks for."""
        if self.augment in AUGMENTATION_PRESETS:
            return AUGMENTATION_PRESETS[self.augment]
        return tuple(name.strip() for name in self.augment.split(",") if name.strip())

    def tfds_options(self):
        return {"data_dir": self.tfds_data_dir, "train_split": self.tfds_train_split,
                "validation_split": self.tfds_validation_split, "download": self.tfds_download}

    def caches_features(self):
        return self.cache_features != "off" and not self.augmentations()

    def to_yaml(self):
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# What `python -m trainer.task` runs with no flags: a few-minute CPU job on generated data that
# needs no network. small_cnn because no ImageNet weights can be fetched offline, and a random
# MobileNetV2 passes on almost nothing of its input (pooled features ~1e-12).
SMOKE = dict(data="demo", backbone="small_cnn", base_weights="none", image_size=96,
             batch_size=32, epochs=5, fine_tune_epochs=3, learning_rate=1e-2,
             fine_tune_learning_rate=1e-3)

# Flags that may change between runs in one model_dir without making it a different run.
RUN_INDEPENDENT = ("model_dir", "strategy", "tpu", "tfds_download", "checkpoint_every_steps",
                   "log_every_steps", "feature_cache",
                   "cache_features", "memory_budget_mb", "deterministic", "steps_per_execution",
                   "jit_compile", "export_tflite", "storage_retry_seconds")

_FIELDS = {field.name: field for field in dataclasses.fields(Config)}


def _base_type(field):
    if typing.get_origin(field.type) is typing.Union:
        return next(arg for arg in typing.get_args(field.type) if arg is not type(None))
    return field.type


def _coerce(field, value, source):
    """YAML gives '1e-4' as a string and 10 where a float is meant; accept what is unambiguous."""
    kind = _base_type(field)
    if value is None and field.default is None:
        return None
    try:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, (str, int, float)):
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise UserError(f"{source}: {field.name} should be {kind.__name__}, got {value!r}")


def define_flags(flag_values=flags.FLAGS):
    """One absl flag per Config field, plus --config and --overwrite."""
    flags.DEFINE_string("config", None, "YAML preset (local or gs://); flags given override it.",
                        flag_values=flag_values)
    flags.DEFINE_bool("dry_run", False, "Print the plan (strategy, batches, classes and counts, "
                      "steps, trainable parameters, outputs) and exit without training or "
                      "writing anything.", flag_values=flag_values)
    flags.DEFINE_bool("overwrite", False, "Start afresh in a model_dir that holds a different run, "
                      "deleting its checkpoints, logs, exports and metrics.", flag_values=flag_values)
    for field in dataclasses.fields(Config):
        help_text = field.metadata["help"]
        if field.metadata["choices"]:
            help_text += f" One of: {', '.join(field.metadata['choices'])}."
        kind = _base_type(field)
        # Strings throughout for choices so that our validator, not absl, words the error.
        define = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float, bool: flags.DEFINE_bool}[kind]
        define(field.name, field.default, help_text, flag_values=flag_values)


def _read_with_tensorflow(path):
    # Imported here: files loads TensorFlow, which --help and flag errors should not wait for.
    from trainer import files
    if not files.exists(path):
        return None
    if files.isdir(path):
        raise UserError(f"config file {path} is a folder: pass the YAML file in it")
    return files.read_text(path)


def load_yaml(path, read_text=_read_with_tensorflow):
    """Reads a preset; every key must be a Config field. read_text(path) gives the file's text,
    or None where there is no such file."""
    text = read_text(path)
    if text is None:
        raise UserError(f"config file {path} not found: check the --config path")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {first_line(error)}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of field: value")
    for key, value in values.items():
        if key not in _FIELDS:
            raise UserError(f"config file {path}: unknown key '{key}' "
                            f"(known keys: {', '.join(_FIELDS)})")
        values[key] = _coerce(_FIELDS[key], value, f"config file {path}")
    return values


def config_name(config_path):
    if config_path:
        return os.path.splitext(os.path.basename(config_path.rstrip("/")))[0]
    return "smoke"


def resolve(flag_values, environ=os.environ, read_text=_read_with_tensorflow):
    """Builds the Config from defaults, the preset (read by read_text, as load_yaml does) and
    the flags actually given."""
    given = {name: flag_values[name].value for name in _FIELDS if flag_values[name].present}
    return resolve_given(given, flag_values["config"].value, environ, read_text)


def from_settings(settings, base=None, environ=os.environ):
    """The Config of trainer.fit: `settings` named as the flags are, over `base` (a Config,
    whose values other than the defaults count as given, or the path of a YAML preset)."""
    config_path = base if isinstance(base, str) else settings.pop("config", None)
    given = {} if base is None or isinstance(base, str) else {
        name: getattr(base, name) for name, field in _FIELDS.items()
        if getattr(base, name) != field.default}
    for name, value in settings.items():
        if name not in _FIELDS:
            near = difflib.get_close_matches(name, [*_FIELDS, "config"], 1)
            raise UserError(f"unknown setting {name}={value!r}"
                            f"{f' (did you mean {near[0]}?)' if near else ''}: the settings "
                            "are the flags of python -m trainer.task --helpfull")
        given[name] = _coerce(_FIELDS[name], value, "trainer.fit")
    return resolve_given(given, config_path, environ)


def resolve_given(given, config_path, environ=os.environ, read_text=_read_with_tensorflow):
    """The Config from defaults, the preset at config_path (or the smoke preset when neither
    it nor data is given) and the values given, by field name."""
    values = {}
    if config_path:
        values.update(load_yaml(config_path, read_text))
    elif "data" not in given:
        values.update(SMOKE)
    values.update(given)
    config = Config(**values)
    if config.backbone not in BACKBONES:
        raise UserError(f"unknown --backbone={config.backbone}: choose one of "
                        f"{', '.join(BACKBONES)}")
    if not config_path and "data" not in given:
        _check_smoke_backbone(given)
    _default_fine_tune_at(config)
    if not config.model_dir:
        config.model_dir = environ.get("AIP_MODEL_DIR") or os.path.join(
            "runs", config_name(config_path) if (config_path or "data" not in given) else "default")
    for name, message in config.problems():
        where = f"--{name}" if name in given else f"config file {config_path}: {name}"
        raise UserError(f"{where}={getattr(config, name)!r} {message}")
    return config


def _default_fine_tune_at(config):
    """The backbone's default layer where none is given: config.yaml records the layer
    trained from, and a run recorded before this resolved it compares equal."""
    if config.fine_tune_at is None:
        config.fine_tune_at = FINE_TUNE_AT.get(config.backbone)


def data_root(data):
    """What to open for --data: 'demo' is the generated demo dataset, written on first use;
    the config keeps the word, so that a run's config.yaml does not depend on where this
    machine caches it."""
    if data != "demo":
        return data
    from trainer import demo
    return demo.ensure()


def _check_smoke_backbone(given):
    """Another backbone on the smoke preset would inherit its random weights and learn almost
    nothing (a random MobileNetV2 passes on almost nothing of its input)."""
    backbone = given.get("backbone", SMOKE["backbone"])
    if backbone != SMOKE["backbone"] and "base_weights" not in given:
        raise UserError(f"--backbone={backbone} without --data or --config runs the smoke "
                        "preset, whose base_weights: none leaves the backbone random: pass "
                        "--base_weights=imagenet (or a weights file), or --data=... for the "
                        "recipe's defaults")


def from_yaml_text(text, source):
    """The Config a model_dir's config.yaml records, for comparing runs."""
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{source} is damaged ({first_line(error)}): use another --model_dir "
                        "or --overwrite") from None
    if not isinstance(values, dict):
        raise UserError(f"{source} is not a mapping of field: value: use another --model_dir "
                        "or --overwrite")
    unknown = [key for key in values if key not in _FIELDS]
    if unknown:
        raise UserError(f"{source} has unknown keys {unknown}: it was written by another version; "
                        f"use another --model_dir or --overwrite")
    config = Config(**values)
    _default_fine_tune_at(config)
    return config


def differences(old, new):
    """Fields, other than RUN_INDEPENDENT ones, whose values differ between two configs (a
    default --fine_tune_at is the backbone's layer)."""
    old, new = dataclasses.replace(old), dataclasses.replace(new)
    for config in (old, new):
        _default_fine_tune_at(config)
    return [(field, getattr(old, field), getattr(new, field)) for field in _FIELDS
            if field not in RUN_INDEPENDENT and getattr(old, field) != getattr(new, field)]
