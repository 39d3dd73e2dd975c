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

from trainer import config as config_lib
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
    has_imagenet_weights: bool = True
    min_image_size: int = 32      # Keras applications refuse smaller inputs


BACKBONES = {
    "mobilenet_v2": Backbone(_application(keras.applications.MobileNetV2),
                             keras.applications.mobilenet_v2.preprocess_input),
    # EfficientNet rescales inside the model; its preprocess_input is the identity.
    "efficientnet_b0": Backbone(_application(keras.applications.EfficientNetB0),
                                keras.applications.efficientnet.preprocess_input),
    "resnet50": Backbone(_application(keras.applications.ResNet50),
                         keras.applications.resnet50.preprocess_input),
    "small_cnn": Backbone(_small_cnn, lambda x: x / 127.5 - 1.0, has_imagenet_weights=False,
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
    preprocess: keras.Model  # raw images -> what the backbone takes


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


def random_frozen_backbone(config):
    """A warning when phase 1 would train a head on a frozen backbone that has no weights: a
    random pretrained architecture passes on almost nothing of its input (MobileNetV2's
    pooled features are about 1e-11), so the loss stays at chance and nothing says why."""
    if config.base_weights != "none" or not config.epochs or \
            not lookup(config.backbone).has_imagenet_weights:
        return None
    return (f"--base_weights=none leaves {config.backbone} random, and phase 1 trains the head "
            "on its frozen features, which carry almost nothing of the images: the loss will "
            "stay near chance. Pass --base_weights=imagenet or a weights file; to train from "
            "scratch, give --epochs=0 --fine_tune_at=0")


def fine_tune_layer(backbone_name, fine_tune_at):
    """--fine_tune_at, or the backbone's default when it is not given."""
    lookup(backbone_name)
    return config_lib.FINE_TUNE_AT[backbone_name] if fine_tune_at is None else fine_tune_at


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
            # Keras's message is the whole URL, then " -- " and the reason: the reason alone.
            reason = first_line(str(error).rpartition(" -- ")[2] or error)
            raise UserError(f"could not download the ImageNet weights of {backbone_name} "
                            f"({reason}): where there is no internet access, copy the weights "
                            "file to a bucket or disk and pass --base_weights=PATH, or train "
                            "from scratch with --base_weights=none") from None
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
    preprocessed = spec.preprocess(images)
    x = backbone(preprocessed, training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    features = keras.Model(images, pooled, name="features")

    head = _head(pooled.shape[1], num_classes, dropout)

    augmented = images
    for name in augmentations:
        augmented = AUGMENTATION_LAYERS[name]()(augmented)
    model = keras.Model(images, head(features(augmented)), name=f"{backbone_name}_classifier")
    inference = keras.Model(images, head(features(images)), name=f"{backbone_name}_inference")
    return Classifier(model, inference, backbone, features, head,
                      keras.Model(images, preprocessed, name="preprocess"))


def _head(num_features, num_classes, dropout):
    """pooled features -> dropout -> Dense(num_classes) logits."""
    inputs = keras.Input((num_features,), name="pooled")
    # Built at a rate above 0, then set: Keras gives a Dropout layer its random state only
    # then, and at 0 the weights initialised after it would be drawn otherwise (a run at
    # dropout 0 would not start where a --head_sweep head at 0 does), and no rate could be
    # set later.
    dropout_layer = keras.layers.Dropout(0.5, name="dropout")
    dropout_layer.rate = dropout
    # float32 logits even under a mixed-precision policy, for a stable softmax and loss.
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(
        dropout_layer(inputs))
    return keras.Model(inputs, logits, name="head")


def copy_head(head):
    """A second head like `head`: the same weights and the same dropout seed (its random
    state is one of its variables), so that, given the same settings, it trains the same."""
    copy = _head(head.input.shape[1], head.output.shape[-1], head.get_layer("dropout").rate)
    for target, source in zip(copy.variables, head.variables, strict=True):
        target.assign(source)
    return copy


def set_dropout(head, rate):
    """Sets the head's dropout rate; a training step traced afterwards uses it."""
    head.get_layer("dropout").rate = rate


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
    check_fine_tune_at(backbone, fine_tune_at)
    backbone.trainable = True
    for layer in backbone.layers[:fine_tune_at]:
        layer.trainable = False
    # Keras 3 passes the outer model's training=True down to the backbone despite the
    # training=False it was wired with; a frozen BatchNormalization layer is the one that
    # reliably stays in inference mode, keeping its pretrained statistics.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def check_fine_tune_at(backbone, fine_tune_at):
    if fine_tune_at >= len(backbone.layers):
        raise UserError(f"--fine_tune_at={fine_tune_at} but {backbone.name} has only "
                        f"{len(backbone.layers)} layers: give a layer index below "
                        f"{len(backbone.layers)}")


# How far below --fine_tune_at a cut may move, taking frozen layers into the trainable top, to
# find a smaller one: far enough to pass a block's last frozen convolution and BatchNorm (in
# MobileNetV2 at 100 that turns 576 + 96 channels into the block input's 96), near enough that
# the top recomputes little.
CUT_SEARCH_LAYERS = 3


@dataclasses.dataclass
class Cut:
    """The backbone split for phase 2: the frozen bottom runs once per image and its outputs,
    the tensors at the cut, are cached; the top (the layers from `layer` up, the pooling and
    the head) trains on them. The bottom is frozen and, like the whole backbone, runs in
    inference mode, so its outputs for an image never change."""
    layer: int            # the first backbone layer in the top
    fine_tune_at: int     # the first one trained: the layers between stay frozen in the top
    bottom: keras.Model   # raw images -> [tensors at the cut]
    top: keras.Model      # [tensors at the cut] -> logits
    both: keras.Model     # raw images -> [pooled features, *tensors at the cut]: both phases' pass

    @property
    def shapes(self):
        return [tuple(tensor.shape[1:]) for tensor in self.top.inputs]

    def bytes_per_image(self, itemsize):
        return sum(int(np.prod(shape)) for shape in self.shapes) * itemsize


def cut(classifier, fine_tune_at):
    """The Cut for phase 2 at fine_tune_at, or None when nothing below it is worth caching (no
    layer but the input). Found on the backbone's graph: the tensors that
    frozen layers produce and trainable ones consume, the smallest such set (in values per
    image) within CUT_SEARCH_LAYERS layers below fine_tune_at."""
    backbone = classifier.backbone
    check_fine_tune_at(backbone, fine_tune_at)
    candidates = []
    for layer in range(fine_tune_at, max(fine_tune_at - CUT_SEARCH_LAYERS, 1) - 1, -1):
        tensors = _tensors_at(backbone, layer)
        if any(tensor is backbone.input for tensor in tensors):
            break  # the cache would hold the preprocessed images: nothing saved
        size = sum(int(np.prod(tensor.shape[1:])) for tensor in tensors)
        candidates.append((size, -layer, tensors))
    if not candidates:
        return None
    _, layer, tensors = min(candidates, key=lambda candidate: candidate[:2])
    below = keras.Model(backbone.input, tensors)
    above = keras.Model(tensors, backbone.output)
    pool = classifier.features.get_layer("pool")
    images = classifier.model.inputs[0]
    at_cut = as_list(below(classifier.preprocess(images), training=False))
    inputs = [keras.Input(tensor.shape[1:], name=f"cut_{index}")
              for index, tensor in enumerate(tensors)]
    # training=False as the backbone is wired in build(): its layers run in inference mode
    # in training too (frozen BatchNorm, no drop-connect), in the top as in the whole model.
    top = keras.Model(unlist(inputs),
                      classifier.head(pool(above(unlist(inputs), training=False))), name="top")
    both = keras.Model(images, [pool(above(unlist(at_cut), training=False)), *at_cut],
                       name="both")
    return Cut(-layer, fine_tune_at, keras.Model(images, at_cut, name="bottom"), top, both)


def _tensors_at(backbone, layer):
    """The tensors that layers below `layer` produce and layers from `layer` up consume (or
    that are the backbone's output), in a fixed order."""
    position = {id(operation): index for index, operation in enumerate(backbone.layers)}
    found = []
    nodes = [node for depth in sorted(backbone._nodes_by_depth, reverse=True)  # inputs first
             for node in backbone._nodes_by_depth[depth]]
    for node in nodes:
        if position.get(id(node.operation), -1) < layer:
            continue
        for tensor in node.input_tensors:
            producer = tensor._keras_history.operation
            if position[id(producer)] < layer and not any(tensor is seen for seen in found):
                found.append(tensor)
    if position[id(backbone.output._keras_history.operation)] < layer:
        found.append(backbone.output)
    return found


def as_list(outputs):
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def unlist(tensors):
    return tensors[0] if len(tensors) == 1 else tensors
