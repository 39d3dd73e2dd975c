import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.conftest import REPO
from trainer import config as config_lib
from trainer import model
from trainer.errors import UserError


def trainable_count(classifier):
    return len(classifier.model.trainable_weights)


def test_phases_freeze_and_unfreeze_mobilenet_v2():
    classifier = model.build("mobilenet_v2", "none", 96, num_classes=3, dropout=0.0)
    model.set_phase(classifier, "head", 100)
    assert trainable_count(classifier) == 2  # the head's Dense kernel and bias
    model.set_phase(classifier, "fine_tune", 100)
    # Layers 100+ of MobileNetV2 hold 18 trainable conv weights (BatchNorm stays frozen).
    assert trainable_count(classifier) == 2 + 18
    assert all(not layer.trainable for layer in classifier.backbone.layers[:100])
    model.set_phase(classifier, "head", 100)
    assert trainable_count(classifier) == 2


@pytest.mark.parametrize("phase", ["head", "fine_tune"])
def test_backbone_batchnorm_stays_in_inference_mode(phase):
    keras.utils.set_random_seed(0)
    classifier = model.build("mobilenet_v2", "none", 96, num_classes=2, dropout=0.0)
    model.set_phase(classifier, phase, 100)
    images = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype(np.float32)
    training = classifier.model(images, training=True).numpy()
    inference = classifier.model(images, training=False).numpy()
    np.testing.assert_allclose(training, inference, rtol=1e-5, atol=1e-6)


def test_base_weights_path_loads_the_files_weights(tmp_path):
    keras.utils.set_random_seed(1)
    source = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False,
                                            weights=None)
    path = str(tmp_path / "mobilenet_v2_no_top.weights.h5")
    source.save_weights(path)
    keras.utils.set_random_seed(2)
    loaded = model.build_backbone("mobilenet_v2", path, 96)
    assert len(loaded.weights) == len(source.weights)
    for mine, theirs in zip(loaded.weights, source.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


@pytest.mark.slow
def test_imagenet_weights_come_from_keras_home_without_network(tmp_path):
    """The file Keras downloads, placed where Keras looks: the real weights='imagenet' path."""
    result = subprocess.run([sys.executable, "-m", "tests.programs.imagenet_from_keras_home"],
                            capture_output=True, text=True, cwd=REPO,
                            env={"KERAS_HOME": str(tmp_path), "PYTHONPATH": REPO,
                                 "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded 260" in result.stdout


def test_weights_file_that_does_not_fit(tmp_path):
    other = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False,
                                           weights=None, alpha=0.5)
    path = str(tmp_path / "alpha05.weights.h5")
    other.save_weights(path)
    with pytest.raises(UserError, match="does not fit mobilenet_v2 without top at 96 px"):
        model.build_backbone("mobilenet_v2", path, 96)


def test_bad_backbone_and_weights_choices(tmp_path):
    with pytest.raises(UserError, match="unknown --backbone=vgg99: choose one of mobilenet_v2"):
        model.build_backbone("vgg99", "none", 96)
    with pytest.raises(UserError, match="small_cnn has no ImageNet weights"):
        model.build_backbone("small_cnn", "imagenet", 96)
    with pytest.raises(UserError, match="--base_weights=/no/such.h5 not found"):
        model.build_backbone("mobilenet_v2", "/no/such.h5", 96)


def test_fine_tune_at_beyond_the_backbone():
    classifier = model.build("small_cnn", "none", 32, num_classes=2, dropout=0.0)
    with pytest.raises(UserError, match="--fine_tune_at=50 but small_cnn has only 13 layers"):
        model.set_phase(classifier, "fine_tune", 50)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet50"])
def test_other_backbones_build_with_their_preprocessing(name):
    classifier = model.build(name, "none", 64, num_classes=2, dropout=0.0)
    model.set_phase(classifier, "fine_tune", model.fine_tune_layer(name, None))
    assert 2 < trainable_count(classifier) < len(classifier.model.weights)
    assert classifier.model(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 2)


@pytest.mark.parametrize("name, size, message", [
    ("mobilenet_v2", 7, "--image_size=7 is outside what mobilenet_v2 can train on here (32 to 1024)"),
    ("resnet50", 100000, "--image_size=100000 is outside what resnet50 can train on here"),
    ("small_cnn", 4, "(8 to 1024)"),
])
def test_image_sizes_a_backbone_cannot_take_are_refused_up_front(name, size, message):
    with pytest.raises(UserError, match=re.escape(message)):
        model.check(name, size, "none")
    model.check(name, 224, "none")


def test_the_config_knows_every_backbone_by_name():
    assert config_lib.BACKBONES == tuple(model.BACKBONES)


def test_the_cut_is_found_on_the_graph_and_moved_down_to_a_smaller_one():
    classifier = model.build("mobilenet_v2", "none", 96, num_classes=2, dropout=0.0)
    # Right below layer 100 two tensors cross: block 11's expanded 576 channels and its
    # 96-channel input, which the residual add needs too. Two frozen layers lower, one does.
    assert [tensor.shape[1:] for tensor in model._tensors_at(classifier.backbone, 100)] == [
        (6, 6, 576), (6, 6, 96)]
    cut = model.cut(classifier, 100)
    assert (cut.layer, cut.shapes, cut.bytes_per_image(2)) == (98, [(6, 6, 96)], 6912)
    # The bottom, then the top, compute what the whole model does.
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype(np.float32)
    pooled, at_cut = cut.both(images)
    np.testing.assert_allclose(cut.top(at_cut).numpy(), classifier.model(images).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled.numpy(), classifier.features(images).numpy(), rtol=1e-6)
    np.testing.assert_allclose(cut.bottom(images).numpy(), at_cut.numpy())


def test_a_cut_the_search_cannot_narrow_keeps_every_tensor_that_crosses_it():
    classifier = model.build("mobilenet_v2", "none", 96, num_classes=2, dropout=0.0)
    # Below layer 112, inside block 12, its 576 expanded channels and the 96 of the residual
    # cross, and they do for as far down as the search goes.
    cut = model.cut(classifier, 112)
    assert (cut.layer, cut.shapes) == (112, [(6, 6, 576), (6, 6, 96)])
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype(np.float32)
    np.testing.assert_allclose(cut.top(cut.bottom(images)).numpy(),
                               classifier.model(images).numpy(), rtol=1e-5, atol=1e-6)


def test_no_cut_when_only_the_input_lies_below():
    classifier = model.build("small_cnn", "none", 32, num_classes=2, dropout=0.0)
    assert model.cut(classifier, 1) is None
    assert model.cut(classifier, 2).layer == 2


@pytest.mark.parametrize("settings, warned", [
    (dict(backbone="mobilenet_v2", base_weights="none"), True),
    (dict(backbone="resnet50", base_weights="none", epochs=3), True),
    (dict(backbone="mobilenet_v2", base_weights="imagenet"), False),
    (dict(backbone="mobilenet_v2", base_weights="none", epochs=0), False),
    (dict(backbone="small_cnn", base_weights="none"), False),  # made to train from scratch
])
def test_a_frozen_backbone_without_weights_is_warned_about(settings, warned):
    from trainer import config as config_lib
    warning = model.random_frozen_backbone(config_lib.Config(**settings))
    assert (warning is not None) is warned
    if warned:
        assert warning.startswith(f"--base_weights=none leaves {settings['backbone']} random")


def test_imagenet_weights_out_of_reach_is_one_whole_line_with_the_ways_out(monkeypatch):
    """Keras's own failure, as it reads offline: the whole URL, then the reason."""
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/tensorflow/"
                        "keras-applications/mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_"
                        "tf_kernels_1.0_96_no_top.h5: None -- [Errno 113] No route to host "
                        "(as this test says)")
    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(UserError) as error:
        model.build_backbone("mobilenet_v2", "imagenet", 96)
    assert str(error.value) == (
        "could not download the ImageNet weights of mobilenet_v2 ([Errno 113] No route to host "
        "(as this test says)): where there is no internet access, copy the weights file to a bucket or disk "
        "and pass --base_weights=PATH, or train from scratch with --base_weights=none")
