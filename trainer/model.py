"""The classifier: a pretrained backbone with its own preprocessing, and a new head.

    raw RGB 0..255 -> backbone preprocessing -> backbone (BatchNorm in inference mode)
      -> global average pooling -> head: dropout -> Dense(num_classes) logits

The preprocessing lives inside the model so the export takes raw pixels. The backbone is
called with training=False, as in the TF transfer-learning tutorial, and its BatchNorm layers
stay frozen in phase 2 too: their statistics remain those of pretraining throughout.
"""

import dataclasses
import typing

import keras
import numpy as np

from trainer import files
from trainer.errors import UserError, first_line


def _small_cnn(input_shape, weights):
    """Four conv blocks, no pretrained weights: for offline smoke runs and fast tests."""
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (16, 32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    backbone = keras.Model(inputs, x, name="small_cnn")
    if weights:
        backbone.load_weights(weights)
    return backbone


def _application(constructor):
    def build(input_shape, weights):
        return constructor(input_shape=input_shape, include_top=False, weights=weights)
    return build


@dataclasses.dataclass(frozen=True)
class Backbone:
    build: typing.Callable        # (input_shape, weights: 'imagenet' | None | path) -> Model
    preprocess: typing.Callable   # raw 0..255 RGB -> what the backbone was trained on
    fine_tune_at: int             # default first layer trained in phase 2
    has_imagenet_weights: bool = True
    min_image_size: int = 32      # Keras applications refuse smaller inputs


BACKBONES = {
    "mobilenet_v2": Backbone(_application(keras.applications.MobileNetV2),
                             keras.applications.mobilenet_v2.preprocess_input, 100),
    # EfficientNet rescales inside the model; its preprocess_input is the identity.
    "efficientnet_b0": Backbone(_application(keras.applications.EfficientNetB0),
                                keras.applications.efficientnet.preprocess_input, 221),
    "resnet50": Backbone(_application(keras.applications.ResNet50),
                         keras.applications.resnet50.preprocess_input, 143),
    "small_cnn": Backbone(_small_cnn, lambda x: x / 127.5 - 1.0, 10, has_imagenet_weights=False,
                          min_image_size=8),
}
# Past this a batch outgrows a machine's memory long before training starts: 32 images of
# 1024 px are 400 MB of input alone, and the backbone's activations are many times that.
MAX_IMAGE_SIZE = 1024


@dataclasses.dataclass
class Classifier:
    model: keras.Model      # raw images -> (augmentation in training) -> logits
    inference: keras.Model  # raw images -> logits, no augmentation layers: what is exported
    backbone: keras.Model
    features: keras.Model   # raw images -> pooled backbone features
    head: keras.Model       # pooled features -> logits


def lookup(name):
    if name not in BACKBONES:
        raise UserError(f"unknown --backbone={name}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def check(backbone_name, image_size, base_weights):
    """The backbone, image size and weights argument, before any work is done."""
    _weights_argument(backbone_name, base_weights, copy=False)
    spec = lookup(backbone_name)
    if not spec.min_image_size <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image_size={image_size} is outside what {backbone_name} can train "
                        f"on here ({spec.min_image_size} to {MAX_IMAGE_SIZE}); pretrained "
                        "backbones do best near the 224 px they were trained at")


def fine_tune_layer(backbone_name, fine_tune_at):
    """--fine_tune_at, or the backbone's default when it is not given."""
    return lookup(backbone_name).fine_tune_at if fine_tune_at is None else fine_tune_at


def trainable_parameters(classifier, fine_tune_at):
    """Trainable parameter count of each phase."""
    counts = {}
    for phase in ("head", "fine_tune"):
        set_phase(classifier, phase, fine_tune_at)
        counts[phase] = sum(int(np.prod(weight.shape))
                            for weight in classifier.model.trainable_weights)
    return counts


def _weights_argument(backbone_name, base_weights, copy=True):
    """What Keras's weights= takes: None, 'imagenet', or a local file (a copy of a remote one,
    unless copy=False: then only whether it exists is checked)."""
    spec = lookup(backbone_name)
    if base_weights == "none":
        return None
    if base_weights == "imagenet":
        if not spec.has_imagenet_weights:
            raise UserError(f"{backbone_name} has no ImageNet weights: use --base_weights=none")
        return "imagenet"
    if not files.exists(base_weights):
        raise UserError(f"--base_weights={base_weights} not found: give 'imagenet', 'none' or "
                        "the path of a weights file")
    return files.local_copy(base_weights) if copy else base_weights


def build_backbone(backbone_name, base_weights, image_size):
    weights = _weights_argument(backbone_name, base_weights)
    try:
        return lookup(backbone_name).build((image_size, image_size, 3), weights)
    except Exception as error:  # Keras raises plain Exception for a failed download.
        reason = first_line(error)
        if weights == "imagenet":
            raise UserError(f"could not get ImageNet weights for {backbone_name} ({reason}); "
                            "without internet access copy the weights file to a bucket or disk "
                            "and pass --base_weights=PATH") from None
        if weights:
            raise UserError(f"--base_weights={base_weights} does not fit {backbone_name} without "
                            f"top at {image_size} px: {reason}") from None
        raise


AUGMENTATION_LAYERS = {
    "flip": lambda: keras.layers.RandomFlip("horizontal"),
    "rotate": lambda: keras.layers.RandomRotation(0.2),
    "zoom": lambda: keras.layers.RandomZoom(0.2),
    "contrast": lambda: keras.layers.RandomContrast(0.2),
    "translate": lambda: keras.layers.RandomTranslation(0.1, 0.1),
}


def build(backbone_name, base_weights, image_size, num_classes, dropout, augmentations=()):
    """The classifier; augmentation layers act in training only, so the export has none."""
    spec = lookup(backbone_name)
    backbone = build_backbone(backbone_name, base_weights, image_size)
    images = keras.Input((image_size, image_size, 3), name="images")
    x = spec.preprocess(images)
    x = backbone(x, training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    features = keras.Model(images, pooled, name="features")

    head_inputs = keras.Input(pooled.shape[1:], name="pooled")
    y = keras.layers.Dropout(dropout, name="dropout")(head_inputs)
    # float32 logits even under a mixed-precision policy, for a stable softmax and loss.
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(y)
    head = keras.Model(head_inputs, logits, name="head")

    augmented = images
    for name in augmentations:
        augmented = AUGMENTATION_LAYERS[name]()(augmented)
    model = keras.Model(images, head(features(augmented)), name=f"{backbone_name}_classifier")
    inference = keras.Model(images, head(features(images)), name=f"{backbone_name}_inference")
    return Classifier(model, inference, backbone, features, head)


def random_state(model):
    """The state of the model's random layers (dropout, augmentation), which advances with every
    training step: checkpointed with the weights, so that a resumed run draws the same masks
    and transforms as an uninterrupted one."""
    return [variable for variable in model.variables
            if variable.path.endswith("seed_generator_state")]


def set_phase(classifier, phase, fine_tune_at):
    """'head': backbone frozen. 'fine_tune': backbone layers from fine_tune_at upward train."""
    backbone = classifier.backbone
    if phase == "head":
        backbone.trainable = False
        return
    if fine_tune_at >= len(backbone.layers):
        raise UserError(f"--fine_tune_at={fine_tune_at} but {backbone.name} has only "
                        f"{len(backbone.layers)} layers")
    backbone.trainable = True
    for layer in backbone.layers[:fine_tune_at]:
        layer.trainable = False
    # Keras 3 passes the outer model's training=True down to the backbone despite the
    # training=False it was wired with; a frozen BatchNormalization layer is the one that
    # reliably stays in inference mode, keeping its pretrained statistics.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
