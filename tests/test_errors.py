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


def test_a_lost_worker_is_a_user_error_only_under_multiworker():
    lost = tf.errors.UnavailableError(None, None, "Collective ops is aborted")
    with pytest.raises(UserError, match=r"another worker stopped \(Collective ops is aborted\)"):
        with errors.from_tensorflow("d", multiworker=True):
            raise lost
    with pytest.raises(tf.errors.UnavailableError):
        with errors.from_tensorflow("d", multiworker=False):
            raise lost


def test_reported_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        with errors.reported():
            raise UserError("what is wrong: what to do")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: what is wrong: what to do\n"
