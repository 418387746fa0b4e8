"""``python -m bench``: every backend, the in-memory layer and the peers, in one table.

Run from the repository root with the project's interpreter: ``.venv/bin/python -m bench
--help``. Workers run this file as a script, in the virtualenv of the implementation they measure.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

harness.main(sys.argv[1:])
