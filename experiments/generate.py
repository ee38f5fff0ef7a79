"""Generate from a Hugging Face checkpoint on a tensor-parallel mesh, printing the text as it is sampled.

    python experiments/generate.py --hf DIR --mesh 1x8 --precision int8 --prompt "Why is the sky blue?" --chat

The same as the console script `jaxtp generate ...` (jaxtp.cli); this script runs it. `--help` lists the flags.
"""

import sys

from jaxtp.cli import RULE, sample
from jaxtp.cli import generate_main as main
from jaxtp.cli import parse_generate_args as parse_args

__all__ = ["RULE", "main", "parse_args", "sample"]  # what tests and users import from this script

if __name__ == "__main__":
    sys.exit(main())
