import os

from absl import flags
import pytest
import yaml

from trainer import config as config_lib
from trainer.errors import UserError


def resolve(*argv, environ=None):
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["task", *argv])
    return config_lib.resolve(flag_values, environ=environ or {})


def write_yaml(tmp_path, text, name="preset.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_flags_is_the_offline_smoke_job():
    config = resolve()
    assert (config.data, config.backbone, config.base_weights) == ("demo", "small_cnn", "none")
    assert config.model_dir == os.path.join("runs", "smoke")


def test_data_without_preset_uses_the_recipe_defaults():
    config = resolve("--data=/photos")
    assert (config.backbone, config.base_weights, config.image_size) == (
        "mobilenet_v2", "imagenet", 160)
    assert config.model_dir == os.path.join("runs", "default")


def test_flags_override_the_preset_which_overrides_defaults(tmp_path):
    preset = write_yaml(tmp_path, "epochs: 7\nlearning_rate: 1e-3\nbatch_size: 16\n", "cats.yaml")
    config = resolve(f"--config={preset}", "--data=/photos", "--batch_size=64")
    assert config.epochs == 7                      # from the preset
    assert config.learning_rate == pytest.approx(1e-3)  # '1e-3' is a string to PyYAML
    assert config.batch_size == 64                 # the flag wins
    assert config.fine_tune_epochs == 10           # the default
    assert config.model_dir == os.path.join("runs", "cats")


def test_flagfile_counts_as_flags(tmp_path):
    preset = write_yaml(tmp_path, "epochs: 7\n")
    flagfile = tmp_path / "job.flags"
    flagfile.write_text(f"--config={preset}\n--epochs=3\n--data=/photos\n")
    assert resolve(f"--flagfile={flagfile}").epochs == 3


def test_model_dir_defaults_to_vertex_aip_model_dir():
    config = resolve("--data=/photos", environ={"AIP_MODEL_DIR": "gs://bucket/job/model"})
    assert config.model_dir == "gs://bucket/job/model"
    assert resolve("--data=/p", "--model_dir=/x", environ={"AIP_MODEL_DIR": "gs://b"}).model_dir == "/x"


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    preset = write_yaml(tmp_path, "epochs: 3\nlerning_rate: 0.1\n")
    with pytest.raises(UserError, match=f"{preset}: unknown key 'lerning_rate'"):
        resolve(f"--config={preset}")


@pytest.mark.parametrize("text, message", [
    ("epochs: lots\n", "epochs should be int"),
    ("strategy: cloud\n", "strategy='cloud' is not one of"),
    ("- a list\n", "must be a mapping"),
    ("epochs: [1\n", "not valid YAML"),
    ("epochs: 1e400\n", "epochs should be int, got '1e400'"),
    ("learning_rate: 1e400\n", "learning_rate=inf must be a finite number"),
])
def test_bad_yaml_values(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        resolve(f"--config={write_yaml(tmp_path, text)}")


@pytest.mark.parametrize("flag, message", [
    ("--strategy=cloud", "--strategy='cloud' is not one of auto, cpu"),
    ("--batch_size=0", "--batch_size=0 must be positive"),
    ("--validation_split=1.5", "--validation_split=1.5 must be at least 0 and below 1"),
    ("--validation_split=-0.1", "--validation_split=-0.1 must be at least 0 and below 1"),
    ("--fine_tune_at=-1", "--fine_tune_at=-1 must be 0 or more"),
    ("--seed=-1", "--seed=-1 must be from 0 to 4294967295"),
    ("--seed=4294967296", "--seed=4294967296 must be from 0 to 4294967295"),
    ("--learning_rate=nan", "--learning_rate=nan must be a finite number"),
    ("--fine_tune_learning_rate=inf", "--fine_tune_learning_rate=inf must be a finite number"),
    ("--head_sweep=learning_rate=1e-3,nan", "gives learning_rate=nan, which must be a finite"),
])
def test_bad_flag_values(flag, message):
    with pytest.raises(UserError, match=message):
        resolve("--data=/photos", flag)


def test_missing_config_file():
    with pytest.raises(UserError, match="config file /nowhere.yaml not found"):
        resolve("--config=/nowhere.yaml")


def test_a_config_that_is_a_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match=f"config file {tmp_path} is a folder: pass the YAML"):
        resolve(f"--config={tmp_path}")


def test_resolved_config_round_trips_and_differences_ignore_placement():
    config = resolve("--data=/photos", "--epochs=4")
    again = config_lib.from_yaml_text(config.to_yaml(), "config.yaml")
    assert again == config
    moved = resolve("--data=/photos", "--epochs=4", "--model_dir=/elsewhere", "--strategy=cpu")
    assert config_lib.differences(config, moved) == []
    assert config_lib.differences(config, resolve("--data=/photos", "--epochs=5")) == [
        ("epochs", 4, 5)]


def test_shipped_presets_load():
    presets = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    for name in os.listdir(presets):
        values = config_lib.load_yaml(os.path.join(presets, name))
        assert yaml.safe_load(config_lib.Config(**values).to_yaml())


def test_another_backbone_on_the_smoke_preset_needs_its_weights_named():
    with pytest.raises(UserError, match="--backbone=mobilenet_v2 without --data or --config runs "
                                        "the smoke preset, whose base_weights: none"):
        resolve("--backbone=mobilenet_v2")
    assert resolve("--backbone=mobilenet_v2", "--base_weights=none").base_weights == "none"
    assert resolve("--backbone=mobilenet_v2", "--data=demo").base_weights == "imagenet"


def test_an_unknown_backbone_is_named_before_anything_else():
    with pytest.raises(UserError, match="unknown --backbone=mobilenet_v3: choose one of "
                                        "mobilenet_v2, efficientnet_b0"):
        resolve("--backbone=mobilenet_v3")


def test_the_config_records_the_layer_phase_2_trains_from():
    config = resolve("--data=/photos")
    assert config.fine_tune_at == 100 and "fine_tune_at: 100" in config.to_yaml()
    assert resolve("--data=/photos", "--backbone=resnet50").fine_tune_at == 143
    assert resolve("--data=/photos", "--fine_tune_at=7").fine_tune_at == 7
    # A run recorded before the layer was resolved is the same run.
    recorded = config.to_yaml().replace("fine_tune_at: 100", "fine_tune_at: null")
    assert config_lib.differences(config_lib.from_yaml_text(recorded, "config.yaml"),
                                  config) == []
