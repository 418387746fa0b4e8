"""Channel-layer backends, one module each; none imports its broker driver at import time."""
