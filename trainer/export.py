"""The exported SavedModel: encoded image bytes in, probabilities and class names out.

    serving_default(image_bytes: string[batch]) ->
        probabilities: float32[batch, classes], classes: string[batch, classes]

Decoding and resizing use the same function as training (pipelines.decode_batch).
"""

import os

import tensorflow as tf
from tensorflow.python.framework import convert_to_constants

from trainer import pipelines
from trainer import files
from trainer.errors import UserError


class _Serving(tf.Module):
    """Tracks the model's variables, not the Keras model: saving a tracked Keras 3 model traces
    every layer's call once more, for functions that serving never uses, which costs most of
    the export's time."""

    def __init__(self, model, class_names, image_size):
        super().__init__()
        self.model_variables = list(model.variables)
        self.class_names = tf.constant(class_names)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(image_bytes):
            images = pipelines.decode_batch(image_bytes, image_size, read_files=False)
            probabilities = tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))
            classes = tf.tile(self.class_names[tf.newaxis], [tf.shape(image_bytes)[0], 1])
            return {"probabilities": probabilities, "classes": classes}

        self.serve = serve


def export(model, class_names, image_size, export_dir):
    """Writes the SavedModel beside export_dir, then renames it into place."""
    staging = f"{export_dir}.tmp-{os.getpid()}"
    files.remove_tree(staging)
    module = _Serving(model, class_names, image_size)
    tf.saved_model.save(module, staging, signatures={"serving_default": module.serve})
    files.remove_tree(export_dir)
    tf.io.gfile.rename(staging, export_dir)
    return export_dir


def load(export_dir):
    """The serving function of an export: call it with image_bytes=<string tensor>. Loading
    runs the SavedModel's graph: load only models you trust."""
    signatures = tf.saved_model.load(export_dir).signatures
    serve = signatures.get("serving_default")
    inputs = serve.structured_input_signature[1] if serve is not None else {}
    if set(inputs) != {"image_bytes"} or inputs["image_bytes"].dtype != tf.string:
        found = (", ".join(f"{name}: {spec.dtype.name}{spec.shape}" for name, spec in
                           inputs.items()) if serve is not None else
                 f"no serving_default (signatures: {', '.join(signatures) or 'none'})")
        raise UserError(f"{export_dir} is not a trainer export: expected serving_default("
                        f"image_bytes: string[batch]), found {found}")
    outputs = serve.structured_outputs
    if not {"probabilities", "classes"} <= set(outputs):
        raise UserError(f"{export_dir} is not a trainer export: its serving_default returns "
                        f"{', '.join(sorted(outputs)) or 'nothing'}, not probabilities and "
                        "classes")
    return serve


class _Probabilities(tf.Module):
    def __init__(self, model, image_size):
        super().__init__()
        self.model = model
        self.predict = tf.function(
            lambda images: tf.nn.softmax(tf.cast(self.model(images, training=False), tf.float32)),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                           name="images")])


def export_tflite(model, image_size, path):
    """model.tflite: float32 RGB 0..255 [batch, size, size, 3] in, probabilities out. Decoding
    stays with the app: TFLite has no image decoders."""
    module = _Probabilities(model, image_size)
    # Weights frozen into constants first: converted as they are, Keras 3's variables stay
    # resource reads that the interpreter leaves unset, and the model outputs NaN.
    frozen = convert_to_constants.convert_variables_to_constants_v2(
        module.predict.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    files.write_bytes(path, converter.convert())
    return path
