"""The one exception type that reaches the user as a single line instead of a traceback, and
the one place where errors from TensorFlow become it."""

import contextlib
import gc
import os
import re
import signal
import sys


class UserError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""


class Stopped(Exception):
    """SIGTERM (a preemption or a stopped job) or SIGINT (Ctrl-C, a notebook's stop button)
    stopped the job after it saved its work: a checkpoint at `step`, or (step None, during the
    pass before training) the chunks of the pass. Running it again resumes."""

    def __init__(self, step, signum):
        self.step = step
        self.signal = signal.Signals(signum).name
        super().__init__(self.line("call trainer.fit again with the same settings"))

    def line(self, again):
        """What happened, and that `again` resumes."""
        if self.step is None:
            return (f"stopped by {self.signal} in the pass over the images: the chunks it "
                    f"finished are kept; {again} to go on from there")
        return (f"stopped by {self.signal} at step {self.step}: checkpoint saved; {again} to "
                "resume")


def first_line(error, limit=200):
    """The first line of an error's message, for quoting inside a one-line UserError."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def op_reason(error):
    """The line of a TensorFlow OpError that says what went wrong. Errors raised inside a
    tf.function start with 'Graph execution error:' and a Python stack; the reason follows."""
    lines = [line.strip() for line in error.message.splitlines()]
    reasons = [line for line in lines if line and not line.startswith(
        ("Graph execution error", "Detected at node", "File ", "[["))]
    return (reasons[-1] if reasons else lines[0])[:200]


RESUME = "what was written is kept: run the same command to resume"


@contextlib.contextmanager
def from_tensorflow(data, multiworker):
    """Turns the errors met while training and exporting whose cause the user can fix into
    UserErrors; the rest stay tracebacks. Checkpoints already written stay, hence the advice to
    run the same command again."""
    import tensorflow as tf  # here, so that importing this module stays cheap for the CLI
    try:
        yield
    except tf.errors.DataLossError as error:
        raise UserError(f"cannot read the data in --data={data}: {op_reason(error)}; the files "
                        "are damaged: prepare or copy them again, then run the same command to "
                        "resume from the last checkpoint") from None
    except (tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.CancelledError, tf.errors.DeadlineExceededError) as error:
        if multiworker:
            raise UserError(f"another worker stopped ({op_reason(error)}); restart all workers "
                            "with the same command to resume from the last checkpoint") from None
        raise UserError(f"storage failed ({op_reason(error)}); check the network or bucket; "
                        f"{RESUME}") from None
    except (tf.errors.ResourceExhaustedError, OSError) as error:
        if "No space left on device" not in str(error):
            raise
        # The first path in the message, past the op's device (/job:localhost/...).
        where = [path for path in re.findall(r"(/[^\s;'}]+?)(?:_temp\b|[\s;'}]|$)",
                                             str(error)) if not path.startswith("/job:")]
        raise UserError(f"a disk is full (No space left on device"
                        f"{' writing ' + where[0] if where else ''}); free some space, then run "
                        "the same command to resume") from None
    except (tf.errors.PermissionDeniedError, tf.errors.FailedPreconditionError) as error:
        raise UserError(f"cannot write ({op_reason(error)}); fix the folder or its permissions; "
                        f"{RESUME}") from None


def reported(function, *args):
    """Calls function(*args). A UserError ends the program as one line on stderr and exit status
    2; Ctrl-C as one line and the shell's 130."""
    try:
        return function(*args)
    except UserError as error:
        line, code = f"error: {error}", 2
    except KeyboardInterrupt:
        line, code = ("stopped by Ctrl-C; what was written is kept: run the same command to "
                      "resume"), 130
    exit_with(sys.stderr, line, code)


def exit_with(stream, line, code):
    """Writes the line and exits. Called outside the except clause that caught the error, so
    that the SystemExit does not keep the error alive: its traceback holds the input pipelines
    of the frames it went through. Python would free them only while shutting down, when
    tf.data threads that call Python (a numpy_function) die, and destroying the pipeline would
    wait for those threads forever. A Ctrl-C while they are freed ends the process at once:
    all there was to keep is kept."""
    stream.write(line + "\n")
    stream.flush()
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signal.SIGINT))
    gc.collect()
    sys.exit(code)
