"""Running an absl main so that user errors end as one line on stderr and exit status 2."""

import sys

from absl import app
from absl import flags

from trainer import errors

HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def _parse(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.stderr.write(f"error: {error}; see --helpfull\n")
        sys.exit(2)
    except SystemExit:
        # absl exits 1 after printing help; asking for help is not a failure.
        if any(arg in HELP for arg in argv[1:]):
            sys.exit(0)
        raise


def run_main(main):
    def guarded(argv):
        with errors.reported():
            main(argv)
    app.run(guarded, flags_parser=_parse)
