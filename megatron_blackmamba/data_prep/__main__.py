"""``blackmamba-prep``: see :mod:`megatron_blackmamba.data_prep.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
