"""``python -m blsp.demo [options]``: the same as ``blsp demo [options]``."""

import sys

from blsp.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
