import json
from unittest import mock

import pytest
import tensorflow as tf

from trainer import strategy
from trainer.errors import UserError

TWO_WORKERS = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                          "task": {"type": "worker", "index": 0}})
VERTEX_SPEC = {"cluster": {"workerpool0": ["chief:2222"], "workerpool1": ["w0:2222", "w1:2222"]},
               "environment": "cloud", "task": {"type": "workerpool1", "index": 1}}


@pytest.mark.parametrize("environ, gpus, expected", [
    ({}, 0, "cpu"),
    ({}, 2, "gpu"),
    ({"TF_CONFIG": TWO_WORKERS}, 0, "multiworker"),
    ({"TF_CONFIG": TWO_WORKERS}, 4, "multiworker"),
    ({"CLUSTER_SPEC": json.dumps(VERTEX_SPEC)}, 1, "multiworker"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker",
                                                                       "index": 0}})}, 0, "cpu"),
    ({"TPU_NAME": "my-tpu", "TF_CONFIG": TWO_WORKERS}, 8, "tpu"),
])
def test_auto_prefers_tpu_then_cluster_then_gpu_then_cpu(environ, gpus, expected):
    kind, reason = strategy.pick("auto", "", environ, gpus=gpus, tpu_device=False)
    assert kind == expected and reason


def test_auto_finds_the_chips_of_a_tpu_vm():
    assert strategy.pick("auto", "", {}, gpus=0, tpu_device=True)[0] == "tpu"


def test_explicit_choice_is_kept():
    assert strategy.pick("cpu", "", {"TPU_NAME": "x"}, gpus=8)[0] == "cpu"


def test_cluster_spec_becomes_tf_config():
    cluster = strategy.cluster_from_environment({"CLUSTER_SPEC": json.dumps(VERTEX_SPEC)})
    assert cluster == {"cluster": {"chief": ["chief:2222"], "worker": ["w0:2222", "w1:2222"]},
                       "task": {"type": "worker", "index": 1}}
    chief = dict(VERTEX_SPEC, task={"type": "workerpool0", "index": 0})
    assert strategy.cluster_from_environment({"CLUSTER_SPEC": json.dumps(chief)})["task"] == {
        "type": "chief", "index": 0}
    with pytest.raises(UserError, match="workerpool2"):
        strategy.cluster_from_environment({"CLUSTER_SPEC": json.dumps(
            dict(VERTEX_SPEC, task={"type": "workerpool2", "index": 0}))})


def test_tf_config_wins_over_cluster_spec():
    environ = {"TF_CONFIG": TWO_WORKERS, "CLUSTER_SPEC": json.dumps(VERTEX_SPEC)}
    assert strategy.cluster_from_environment(environ) == json.loads(TWO_WORKERS)


def test_multiworker_without_cluster_is_an_error():
    with pytest.raises(UserError, match="needs TF_CONFIG or CLUSTER_SPEC"):
        strategy.create("multiworker", "", {})


def test_cpu_is_the_default_strategy():
    created, kind, _ = strategy.create("cpu", "", {})
    assert kind == "cpu" and created is tf.distribute.get_strategy()
    assert strategy.is_chief(created)


def test_tpu_without_a_name_is_an_error():
    with pytest.raises(UserError, match="--strategy=tpu needs a TPU"):
        strategy.create("tpu", "", {})


def test_tpu_local_without_tpu_chips_is_refused_before_initialising():
    """Initialising without chips crashes TensorFlow 2.20 with the PJRT plug-in (the tpu
    image): it must not be reached."""
    with mock.patch.object(strategy, "TPU_DEVICES", ("/nonexistent/accel0",)), \
            mock.patch.object(tf.tpu.experimental, "initialize_tpu_system") as initialise:
        with pytest.raises(UserError, match="--tpu=local but this host has no TPU chips "
                                            r"\(none of /nonexistent/accel0\)"):
            strategy.create("tpu", "local", {})
    initialise.assert_not_called()


def test_tpu_local_with_chips_that_do_not_answer_fails_fast(tmp_path):
    """The real resolver: a device file but no TPU behind it; initialisation finds none."""
    (tmp_path / "accel0").write_text("")
    with mock.patch.object(strategy, "TPU_DEVICES", (str(tmp_path / "accel0"),)):
        with pytest.raises(UserError, match="no TPU reachable as --tpu=local: (?!Graph)"):
            strategy.create("tpu", "local", {})


def test_tpu_path_connects_initialises_and_builds_the_strategy():
    """Mocked at the TF API boundary: resolver, connect, initialise, TPUStrategy."""
    resolver = mock.Mock()
    with mock.patch.object(tf.distribute.cluster_resolver, "TPUClusterResolver",
                           return_value=resolver) as make_resolver, \
            mock.patch.object(tf.config, "experimental_connect_to_cluster") as connect, \
            mock.patch.object(tf.tpu.experimental, "initialize_tpu_system") as initialise, \
            mock.patch.object(tf.distribute, "TPUStrategy", return_value="tpu!") as make:
        created, kind, _ = strategy.create("auto", "", {"TPU_NAME": "pod-v4-32"})
    make_resolver.assert_called_once_with(tpu="pod-v4-32")
    connect.assert_called_once_with(resolver)
    initialise.assert_called_once_with(resolver)
    make.assert_called_once_with(resolver)
    assert (created, kind) == ("tpu!", "tpu")


def test_unreachable_tpu_name_is_one_line_error():
    with mock.patch.object(tf.distribute.cluster_resolver, "TPUClusterResolver",
                           side_effect=ValueError("Could not lookup TPU metadata\nmore")):
        with pytest.raises(UserError, match="no TPU reachable as --tpu=nope: Could not lookup"):
            strategy.create("tpu", "nope", {})


@pytest.mark.parametrize("cuda, advice", [(True, "no NVIDIA GPU or driver"),
                                           (False, "built without CUDA")])
def test_gpu_without_gpus_is_an_error(cuda, advice):
    with mock.patch.object(tf.config, "list_physical_devices", return_value=[]), \
            mock.patch.object(tf.test, "is_built_with_cuda", return_value=cuda):
        with pytest.raises(UserError, match=f"sees no GPU: .*{advice}"):
            strategy.create("gpu", "", {})


@pytest.mark.parametrize("gpus, expected, arguments", [
    (1, tf.distribute.OneDeviceStrategy, ("/gpu:0",)),  # on the GPU, not the CPU
    (2, tf.distribute.MirroredStrategy, ()),            # every GPU TensorFlow sees
])
def test_gpu_strategy_by_count(gpus, expected, arguments):
    with mock.patch.object(tf.config, "list_physical_devices", return_value=["gpu"] * gpus), \
            mock.patch.object(tf.distribute, expected.__name__, return_value="made") as make:
        assert strategy.create("gpu", "", {})[0] == "made"
    make.assert_called_once_with(*arguments)


def _resolver(task_type, task_id, cluster):
    resolver = mock.Mock(spec=tf.distribute.cluster_resolver.TFConfigClusterResolver)
    resolver.task_type, resolver.task_id = task_type, task_id
    resolver.cluster_spec.return_value = tf.train.ClusterSpec(cluster)
    return resolver


@pytest.mark.parametrize("task_type, task_id, cluster, chief", [
    ("worker", 0, {"worker": ["a:1", "b:1"]}, True),
    ("worker", 1, {"worker": ["a:1", "b:1"]}, False),
    ("chief", 0, {"chief": ["a:1"], "worker": ["b:1"]}, True),
    ("worker", 0, {"chief": ["a:1"], "worker": ["b:1"]}, False),
])
def test_only_the_chief_writes(task_type, task_id, cluster, chief):
    fake = mock.Mock(cluster_resolver=_resolver(task_type, task_id, cluster))
    assert strategy.is_chief(fake) is chief


@pytest.mark.parametrize("kind, precision, expected", [
    ("cpu", "auto", "float32"), ("gpu", "auto", "mixed_float16"), ("tpu", "auto", "mixed_bfloat16"),
    ("cpu", "bf16", "mixed_bfloat16"), ("gpu", "off", "float32"),
])
def test_mixed_precision_policy(kind, precision, expected):
    assert strategy.execution(kind, precision, 0, "auto", 100).policy == expected


def test_steps_per_execution_and_jit_defaults():
    assert strategy.execution("tpu", "auto", 0, "auto", 100).steps_per_execution == 50
    assert strategy.execution("tpu", "auto", 0, "auto", 20).steps_per_execution == 20
    assert strategy.execution("cpu", "auto", 0, "auto", 100).steps_per_execution == 1
    assert strategy.execution("gpu", "auto", 8, "auto", 100).steps_per_execution == 8
    assert strategy.execution("tpu", "auto", 0, "auto", 9).jit_compile is True
    assert strategy.execution("cpu", "auto", 0, "auto", 9).jit_compile is False
    assert strategy.execution("gpu", "auto", 0, "on", 9).jit_compile is True


def test_remote_tpu_needs_gcs_paths():
    with pytest.raises(UserError, match="--data=/home/me/photos is a local path"):
        strategy.check_paths_reachable("tpu", "my-tpu", {"data": "/home/me/photos"})
    strategy.check_paths_reachable("tpu", "my-tpu", {"data": "gs://b/photos"})
    strategy.check_paths_reachable("tpu", "local", {"data": "/home/me/photos"})
