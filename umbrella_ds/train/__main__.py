"""Entry point as ``python -m umbrella_ds.train`` and as a script path
(``python umbrella_ds/train/__main__.py``: DeepSpeed's SLURM launcher ignores ``--module``).
Absolute imports only, so both forms work."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository importable even without an installed package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from umbrella_ds.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
