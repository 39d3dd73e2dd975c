"""What each phase trains on (trainer/phase_data.py): decided before training, and the
batches and validation data it gives the loop."""

import numpy as np
import pytest

from tests.test_train import tiny_trainer
from trainer import config as config_lib
from trainer import phase_data


class _Cut:
    layer, fine_tune_at, shapes = 7, 9, [(4, 4, 8)]

    def bytes_per_image(self, itemsize):
        return 128 * itemsize


@pytest.mark.parametrize("settings, cut, head, fine_tune", [
    ({}, _Cut(), "pooled backbone features",
     "the activations entering backbone layer 7, 2 frozen layer(s) below --fine_tune_at=9, "
     "where fewer values cross (4x4x8, 0.2 KB an image as float16 unless their values do not "
     "fit it, then twice that as float32)"),
    ({}, None, "pooled backbone features", "no frozen backbone layer below --fine_tune_at"),
    ({"cache_features": "off"}, None, "(--cache_features=off)", "(--cache_features=off)"),
    ({"augment": "flip"}, None, "--augment changes them", "--augment changes them"),
])
def test_what_each_phase_trains_on_is_decided_before_training(settings, cut, head, fine_tune):
    inputs = phase_data.phase_inputs(config_lib.Config(**settings), cut)
    assert head in inputs["head"].description and fine_tune in inputs["fine_tune"].description
    assert inputs["head"].cached is (head.startswith("pooled"))
    assert inputs["fine_tune"].cached is (cut is not None)


def _batches(dataset, steps):
    iterator = iter(dataset)
    return [tuple(np.asarray(part) for part in next(iterator)) for _ in range(steps)]


def test_each_phase_runs_its_part_of_the_model_on_what_was_cached(tmp_path, capsys):
    with tiny_trainer(tmp_path, batch_size=4) as trainer:
        data, schedule = trainer.data, trainer.schedule
        classifier = trainer.classifier
        assert data.model(schedule.head) is classifier.head
        assert data.model(schedule.fine_tune) is data.cut.top
        train, (validation, steps) = data.for_phase(schedule.head, 0, schedule.end_step(schedule.head))
        assert "cached backbone features and activations entering layer" in capsys.readouterr().out
        [(features, labels, weights)] = _batches(train, 1)
        assert features.shape == (4, classifier.features.output_shape[-1])
        assert steps == 1 and weights.tolist() == [1, 1, 1, 1]
        (inputs, _, validation_weights), = _batches(validation, 1)
        assert validation_weights.tolist() == [1, 1, 0, 0]  # 2 images, padded to the batch
        # Phase 2 starts mid-way (a resume) and reads the activations of the same pass.
        train, _ = data.for_phase(schedule.fine_tune, schedule.steps_per_epoch + 1,
                                  schedule.end_step(schedule.fine_tune))
        [(activations, _, _)] = _batches(train, 1)
        assert activations.shape[1:] == data.cut.shapes[0]
        assert "cached" not in capsys.readouterr().out  # no second backbone pass


def test_without_caching_every_phase_reads_images_decoded_once(tmp_path, capsys):
    with tiny_trainer(tmp_path, batch_size=4, cache_features="off") as trainer:
        data, schedule = trainer.data, trainer.schedule
        assert data.model(schedule.head) is data.model(schedule.fine_tune) is \
            trainer.classifier.model
        train, (validation, steps) = data.for_phase(schedule.head, 0, schedule.end_step(schedule.head))
        [(images, _, _)] = _batches(train, 1)
        assert images.shape == (4, 16, 16, 3) and steps == 1
        assert "decoded 10 images once" in capsys.readouterr().out
        data.for_phase(schedule.fine_tune, schedule.steps_per_epoch,
                       schedule.end_step(schedule.fine_tune))
        assert "decoded" not in capsys.readouterr().out
