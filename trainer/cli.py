"""Running an absl main so that user errors end as one line on stderr and exit status 2, and a
normal run shows only the job's own lines and real warnings."""

import contextlib
import gc
import os
import re
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

from trainer import errors

HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def _parse(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.stderr.write(f"error: {error}; see --helpfull\n")
        sys.exit(2)
    except UnicodeDecodeError as error:  # absl reads a --flagfile as UTF-8 text
        sys.stderr.write(f"error: a --flagfile is not UTF-8 text ({error.reason} at byte "
                         f"{error.start}): save it as UTF-8\n")
        sys.exit(2)
    except SystemExit:
        # absl exits 1 after printing help; asking for help is not a failure.
        if any(arg in HELP for arg in argv[1:]):
            sys.exit(0)
        raise


def run_main(main):
    def guarded(argv):
        # TensorFlow's Python side logs routine INFO lines through absl (a line per checkpoint
        # saved, per exported signature); --verbosity=0 brings them back.
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        errors.reported(main, argv)
    app.run(guarded, flags_parser=_parse)


# Written from C++ while TensorFlow loads, before its logging is set up, so that
# TF_CPP_MIN_LOG_LEVEL cannot silence them (tensorflow/tensorflow#100442).
_LOAD_NOTICES = re.compile(r"oneDNN custom operations are on|All log messages before "
                           r"absl::InitializeLog\(\) is called")


@contextlib.contextmanager
def loading_tensorflow():
    """For importing TensorFlow and Keras: leaves TensorFlow's start-up notices out of stderr
    while they load (every other line written meanwhile goes through; a file rather than a pipe
    holds them, so that a loud load cannot block), and pauses the garbage collector. The load
    makes some 300,000 objects that live as long as the process: the 760 collections they set
    off found next to nothing and cost 0.2 s of every start."""
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        collecting = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if collecting:
                gc.enable()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not _LOAD_NOTICES.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()
