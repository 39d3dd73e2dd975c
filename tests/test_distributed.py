"""Several replicas and several workers, on this one CPU machine."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY_MODEL, cli_env, run_module

pytestmark = pytest.mark.slow  # every test here runs worker processes

WORKER_TIMEOUT = 240
JOB = ["--data=demo", *TINY_MODEL, "--image_size=48",
       "--epochs=2", "--fine_tune_epochs=1", "--learning_rate=1e-2", "--batch_size=32"]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for handle in sockets:
        handle.bind(("127.0.0.1", 0))
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


def _cluster_spec(ports, index):
    pools = {"workerpool0": [f"127.0.0.1:{ports[0]}"], "workerpool1": [f"127.0.0.1:{ports[1]}"]}
    task = {"type": "workerpool0" if index == 0 else "workerpool1", "index": 0}
    return json.dumps({"cluster": pools, "task": task, "environment": "cloud"})


def _launch(args, variables, tmp_path):
    """One process per worker; each gets its own TMPDIR so leftovers can be checked."""
    workers = []
    for index, variable in enumerate(variables):
        temp = tmp_path / f"tmp{index}"
        temp.mkdir(exist_ok=True)
        env = cli_env(TMPDIR=str(temp), **variable)
        workers.append(subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=env,
                                        cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
    return workers


def _finish(workers, timeout=WORKER_TIMEOUT):
    results = []
    deadline = time.time() + timeout
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=max(1, deadline - time.time()))
            results.append((worker.returncode, out, err))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return results


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """(metrics, --feature_cache folder) of the job on one process."""
    model_dir = str(tmp_path_factory.mktemp("single") / "run")
    shared = str(tmp_path_factory.mktemp("feature_cache"))
    process = run_module("trainer.task", f"--model_dir={model_dir}", "--strategy=cpu",
                         f"--feature_cache={shared}", *JOB)
    assert process.returncode == 0, process.stderr[-2000:]
    return _metrics(model_dir), shared


# With TF_CONFIG both workers find the backbone pass in the single process's --feature_cache;
# with CLUSTER_SPEC, in a cache of their own, neither does: both run it, the chief keeps it.
@pytest.mark.parametrize("variable", ["TF_CONFIG", "CLUSTER_SPEC"])
def test_two_workers_train_end_to_end(tmp_path, single_process, variable):
    single_process, shared = single_process
    if variable == "CLUSTER_SPEC":
        shared = str(tmp_path / "feature_cache")
    model_dir = str(tmp_path / "run")
    ports = _free_ports(2)
    make = _tf_config if variable == "TF_CONFIG" else _cluster_spec
    workers = _launch([f"--model_dir={model_dir}", f"--feature_cache={shared}", *JOB],
                      [{variable: make(ports, index)} for index in range(2)], tmp_path)
    results = _finish(workers)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert "strategy multiworker" in results[0][1] and "2 replica(s)" in results[0][1]
    # Each worker computes its part of the backbone pass and gathers the rest (see train.py),
    # or every worker reads it from the feature cache, phase 2's when phase 2 starts.
    lines = (["read backbone features of 360 train", "read activations entering layer 10 of "
              "360 train"] if variable == "TF_CONFIG" else
             ["cached backbone features and activations entering layer 10 of 360 train"])
    assert all(line in out for line in lines for _, out, _ in results)
    assert len(os.listdir(shared)) == 4  # features and activations, train and validation
    metrics = _metrics(model_dir)
    assert metrics["global_steps"] == single_process["global_steps"] == 3 * 12
    assert metrics["replicas"] == 2 and metrics["epochs_completed"] == 3
    # The same steps on the same global batches: only the order of float sums differs (seen:
    # validation losses 1e-4 apart), so at most a borderline image or two may flip.
    for two, one in zip(metrics["history"], single_process["history"], strict=True):
        assert abs(two["val_loss"] - one["val_loss"]) <= 1e-3, (two, one)
        assert abs(two["val_accuracy"] - one["val_accuracy"]) <= 2 / 90 + 1e-9, (two, one)
    assert "validation accuracy" in results[0][1] and "validation accuracy" not in results[1][1]
    # Only the chief wrote: the worker's scratch checkpoints and export are gone.
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "config.yaml", "data.json", "export",
                                             "labels.txt", "logs", "metrics.json", "report.png"]
    assert not os.listdir(tmp_path / "tmp1")


def _launch_until_a_checkpoint(args, model_dir, tmp_path):
    """Two workers from TF_CONFIG, once the first checkpoint is written."""
    ports = _free_ports(2)
    workers = _launch(args, [{"TF_CONFIG": _tf_config(ports, index)} for index in range(2)],
                      tmp_path)
    checkpoints = os.path.join(model_dir, "checkpoints")
    deadline = time.time() + WORKER_TIMEOUT
    while not (os.path.isdir(checkpoints) and any(name.endswith(".index")
                                                   for name in os.listdir(checkpoints))):
        assert all(w.poll() is None for w in workers) and time.time() < deadline
        time.sleep(0.05)
    return workers


def test_killed_worker_then_restart_of_all_completes(tmp_path):
    model_dir = str(tmp_path / "run")
    args = [f"--model_dir={model_dir}", *JOB, "--epochs=4"]  # the last --epochs wins
    workers = _launch_until_a_checkpoint(args, model_dir, tmp_path)
    workers[1].send_signal(signal.SIGKILL)
    survivor_code, _, survivor_err = _finish(workers[:1])[0]
    workers[1].wait()
    assert survivor_code != 0
    assert "Traceback" not in survivor_err
    assert "restart all workers with the same command" in survivor_err

    ports = _free_ports(2)
    variables = [{"TF_CONFIG": _tf_config(ports, index)} for index in range(2)]
    results = _finish(_launch(args, variables, tmp_path))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "resuming at step" in results[0][1]
    metrics = _metrics(model_dir)
    assert metrics["resumed_from_epoch"] >= 1
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, 6))


def test_sigterm_to_one_worker_stops_every_worker_at_one_step_and_all_resume(tmp_path):
    """A preemption notice reaches one VM: every worker agrees on the step, the checkpoint
    is saved, and all exit 42; the same command on all resumes there."""
    model_dir = str(tmp_path / "run")
    args = [f"--model_dir={model_dir}", *JOB, "--epochs=6"]  # the last --epochs wins
    workers = _launch_until_a_checkpoint(args, model_dir, tmp_path)
    workers[1].send_signal(signal.SIGTERM)  # the worker, not the chief
    results = _finish(workers)
    stopped = [re.findall(r"^stopped by SIGTERM at step (\d+): checkpoint saved", out, re.M)
               for _, out, _ in results]
    assert [code for code, _, _ in results] == [42, 42], [err[-2000:] for _, _, err in results]
    assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped
    step = int(stopped[0][0])
    assert tf_latest_step(os.path.join(model_dir, "checkpoints")) == step and step < 7 * 12

    ports = _free_ports(2)
    variables = [{"TF_CONFIG": _tf_config(ports, index)} for index in range(2)]
    results = _finish(_launch(args, variables, tmp_path))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert all(f"resuming at step {step} of {7 * 12}" in out for _, out, _ in results)
    assert [row["epoch"] for row in _metrics(model_dir)["history"]] == list(range(1, 8))


def tf_latest_step(checkpoints):
    with open(os.path.join(checkpoints, "checkpoint")) as handle:
        first = handle.readline()  # model_checkpoint_path: "ckpt-N"
    return int(re.search(r"ckpt-(\d+)", first).group(1))


def test_mirrored_over_two_cpus_matches_one_device(tmp_path):
    """Same global batch, same seed: 2 replicas must give the same weights as 1."""
    result = subprocess.run([sys.executable, "-m", "tests.programs.mirrored_two_cpus",
                             str(tmp_path)], capture_output=True, text=True, env=cli_env(),
                            cwd=REPO, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    replicas = [line.split()[1] for line in result.stdout.splitlines()
                if line.startswith("replicas")]
    assert replicas == ["1", "2"]
    assert result.stdout.count("cached backbone features and activations") == 2
    assert "same weights" in result.stdout
