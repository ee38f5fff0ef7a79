"""`python -m jaxtp COMMAND ...`: the `jaxtp` console script (jaxtp.cli)."""

import sys

from jaxtp.cli import main

sys.exit(main())
