"""Picks the tf.distribute strategy the job runs under (after Model Garden's distribute_utils).

Create the strategy before any other TensorFlow work: multi-worker collectives and TPU
initialisation must come first in the process.
"""

import dataclasses
import json
import os
import socket

import tensorflow as tf

from trainer.errors import UserError, first_line, op_reason

# TPUClusterResolver asks the GCE metadata server with no timeout; bound every socket it opens.
_RESOLVER_TIMEOUT_SECONDS = 10


def cluster_from_environment(environ):
    """The TF_CONFIG dict, derived from Vertex AI's CLUSTER_SPEC when only that is set."""
    if environ.get("TF_CONFIG"):
        return json.loads(environ["TF_CONFIG"])
    if not environ.get("CLUSTER_SPEC"):
        return None
    spec = json.loads(environ["CLUSTER_SPEC"])
    pools = spec.get("cluster", {})
    cluster = {}
    if pools.get("workerpool0"):
        cluster["chief"] = pools["workerpool0"]
    if pools.get("workerpool1"):
        cluster["worker"] = pools["workerpool1"]
    task = spec.get("task", {})
    task_type = {"workerpool0": "chief", "workerpool1": "worker"}.get(task.get("type"))
    if task_type is None:
        raise UserError(f"CLUSTER_SPEC names task type {task.get('type')!r}; only workerpool0 "
                        "(chief) and workerpool1 (workers) can train")
    return {"cluster": cluster, "task": {"type": task_type, "index": task.get("index", 0)}}


def _cluster_size(cluster):
    return sum(len(tasks) for tasks in (cluster or {}).get("cluster", {}).values())


# A TPU VM's chips: /dev/accel* (v4, v5e) or /dev/vfio/* (v5p and later).
TPU_DEVICES = ("/dev/accel0", "/dev/vfio/0")


def _tpu_device_present():
    return any(os.path.exists(path) for path in TPU_DEVICES)


def pick(name, tpu="", environ=os.environ, gpus=None, tpu_device=None):
    """Resolves --strategy=auto to a concrete name, with the reason it was chosen. gpus and
    tpu_device (whether this host has TPU chips) are looked up when not given."""
    if name != "auto":
        return name, "asked for with --strategy"
    if tpu_device is None:
        tpu_device = _tpu_device_present()
    if tpu or environ.get("TPU_NAME") or tpu_device:
        return "tpu", "a TPU is configured (--tpu, $TPU_NAME or a TPU device)"
    cluster = cluster_from_environment(environ)
    if _cluster_size(cluster) > 1:
        return "multiworker", f"the cluster has {_cluster_size(cluster)} tasks"
    if gpus is None:
        gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus:
        return "gpu", f"{gpus} GPU(s) found"
    return "cpu", "no TPU, cluster or GPU found"


def _tpu_strategy(tpu, environ):
    tpu = tpu or environ.get("TPU_NAME", "")
    if not tpu:
        raise UserError("--strategy=tpu needs a TPU: pass --tpu=local on a TPU VM, --tpu=NAME, "
                        "or set TPU_NAME")
    if tpu == "local" and not _tpu_device_present():
        # Checked first: with the PJRT plug-in (our tpu image), TensorFlow 2.20 crashes the
        # process (SIGSEGV) in initialize_tpu_system when libtpu finds no chips.
        raise UserError(f"--tpu=local but this host has no TPU chips (none of "
                        f"{', '.join(TPU_DEVICES)}): run on a TPU VM, name a remote TPU with "
                        "--tpu=NAME, or use --strategy=cpu|gpu")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_RESOLVER_TIMEOUT_SECONDS)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, OSError) as error:
        reason = op_reason(error) if isinstance(error, tf.errors.OpError) else first_line(error)
        raise UserError(f"no TPU reachable as --tpu={tpu}: {reason}; "
                        "check the TPU name and zone, or use --strategy=cpu|gpu") from None
    finally:
        socket.setdefaulttimeout(previous)
    return tf.distribute.TPUStrategy(resolver)


def _multiworker_strategy(environ):
    cluster = cluster_from_environment(environ)
    if cluster is None:
        raise UserError("--strategy=multiworker needs TF_CONFIG or CLUSTER_SPEC describing the "
                        "cluster (Vertex AI sets them for multi-replica jobs)")
    os.environ["TF_CONFIG"] = json.dumps(cluster)
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def _gpu_strategy():
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        if tf.test.is_built_with_cuda():
            raise UserError("--strategy=gpu but TensorFlow sees no GPU: this machine has no "
                            "NVIDIA GPU or driver that TensorFlow can use (nvidia-smi tells); "
                            "run on a GPU machine or use --strategy=cpu")
        raise UserError("--strategy=gpu but TensorFlow sees no GPU: this TensorFlow is built "
                        "without CUDA; install the GPU build (pip install 'tensorflow[and-cuda]') "
                        "or use --strategy=cpu")
    if len(gpus) == 1:
        return tf.distribute.OneDeviceStrategy("/gpu:0")
    return tf.distribute.MirroredStrategy()


def create(name, tpu="", environ=os.environ):
    """Returns (strategy, kind, reason); kind is the concrete name after resolving 'auto'."""
    kind, reason = pick(name, tpu, environ)
    if kind == "tpu":
        strategy = _tpu_strategy(tpu, environ)
    elif kind == "multiworker":
        strategy = _multiworker_strategy(environ)
    elif kind == "gpu":
        strategy = _gpu_strategy()
    else:
        strategy = tf.distribute.get_strategy()
    return strategy, kind, reason


def is_chief(strategy):
    """Whether this process writes the job's outputs; every other worker only trains."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type or isinstance(
            resolver, tf.distribute.cluster_resolver.TPUClusterResolver):
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


@dataclasses.dataclass
class Execution:
    """How the training step runs on the chosen hardware."""
    policy: str               # Keras mixed-precision policy
    steps_per_execution: int
    jit_compile: bool


def execution(kind, mixed_precision, steps_per_execution, jit_compile, steps_per_epoch):
    policy = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16", "off": "float32",
              "auto": {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}.get(kind, "float32")
              }[mixed_precision]
    if not steps_per_execution:
        # Each call from Python to a TPU costs far more than a step; elsewhere it is cheap.
        steps_per_execution = min(50, steps_per_epoch) if kind == "tpu" else 1
    jit = {"on": True, "off": False, "auto": kind == "tpu"}[jit_compile]
    return Execution(policy, steps_per_execution, jit)


def check_paths_reachable(kind, tpu, paths):
    """A remote TPU's hosts read and write through GCS: local paths there are another disk."""
    if kind != "tpu" or (tpu or "local") == "local":
        return
    for flag, path in paths.items():
        if path and not path.startswith("gs://"):
            raise UserError(f"--{flag}={path} is a local path, but the TPU {tpu} runs on other "
                            f"hosts that cannot read it: use a gs:// path")
