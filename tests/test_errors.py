import weakref

import pytest
import tensorflow as tf

from trainer import errors
from trainer.errors import UserError


def test_first_line_quotes_one_line_of_any_error():
    assert errors.first_line(ValueError("bad value\n  details")) == "bad value"
    assert errors.first_line(KeyError()) == "KeyError"
    assert len(errors.first_line(ValueError("x" * 500))) == 200


def test_damaged_data_becomes_a_user_error_that_says_resume():
    with pytest.raises(UserError, match=r"cannot read the data in --data=gs://b/d: corrupted "
                                        r"record at 12; .*run the same command to resume"):
        with errors.from_tensorflow("gs://b/d", multiworker=False):
            raise tf.errors.DataLossError(None, None, "corrupted record at 12")


def test_a_lost_worker_or_lost_storage_is_a_user_error_that_says_resume():
    lost = tf.errors.UnavailableError(None, None, "Collective ops is aborted")
    with pytest.raises(UserError, match=r"another worker stopped \(Collective ops is aborted\)"):
        with errors.from_tensorflow("d", multiworker=True):
            raise lost
    with pytest.raises(UserError, match=r"storage failed \(Collective ops is aborted\); .*run "
                                        r"the same command to resume"):
        with errors.from_tensorflow("d", multiworker=False):
            raise lost


@pytest.mark.parametrize("node", [
    "{{function_node x}}",
    # As TensorFlow 2.21 names the op's device first.
    "{{function_node __wrapped__SaveV2_dtypes_3_device_/job:localhost/replica:0/task:0/device:"
    "CPU:0}}",
])
def test_a_full_disk_is_a_user_error_and_other_exhaustion_is_not(node):
    full = tf.errors.ResourceExhaustedError(
        None, None, f"{node} /mnt/run/checkpoints/ckpt-24_temp/part-0; No space "
                    "left on device [Op:SaveV2]")
    with pytest.raises(UserError, match=r"a disk is full \(No space left on device writing "
                                        r"/mnt/run/checkpoints/ckpt-24\); free some space"):
        with errors.from_tensorflow("d", multiworker=False):
            raise full
    with pytest.raises(tf.errors.ResourceExhaustedError):
        with errors.from_tensorflow("d", multiworker=False):
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")


def test_reported_user_error_is_one_line_and_exit_2(capsys):
    def job():
        raise UserError("what is wrong: what to do")
    with pytest.raises(SystemExit) as exited:
        errors.reported(job)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: what is wrong: what to do\n"


def test_reported_error_frees_what_its_frames_held(capsys):
    """An input pipeline left in the frames of an error must be freed before Python shuts
    down (see errors.reported): a job whose damaged shard was reported hung at exit."""
    class Pipeline:
        pass

    def job():
        pipeline = Pipeline()
        held.append(weakref.ref(pipeline))
        try:
            raise tf.errors.DataLossError(None, None, "corrupted record at 12")
        except tf.errors.DataLossError:
            raise UserError("cannot read the data") from None

    held = []
    with pytest.raises(SystemExit) as exited:
        errors.reported(job)
    assert exited.value.code == 2 and held[0]() is None
