"""The main job: train a small tensor-parallel LM on a CPU mesh and report what a TP engineer wants.

    python experiments/run.py --mesh 2x4          # the same as the console script: jaxtp run --mesh 2x4
    python experiments/run.py --hf DIR --data notes.txt --mesh 2x4 --export-hf OUT   # fine-tune a checkpoint
    python experiments/run.py --plan --model 7b --mesh 8x8                          # = jaxtp plan ...

The job lives in the package (jaxtp.cli: flags and input checks; jaxtp.job: the training job); this script
runs it. `--help` lists the flags.
"""

import sys

from jaxtp.cli import run_main as main

if __name__ == "__main__":
    sys.exit(main())
