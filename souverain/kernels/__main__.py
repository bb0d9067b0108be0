"""`python -m souverain.kernels`: build this machine's kernels now (scripts/setup.sh runs it)."""

import logging
import sys

from souverain import kernels

logging.basicConfig(level=logging.WARNING)
module = kernels.load()
print(f"souverain kernels: {'built in ' + str(kernels.build_dir()) if module else 'unavailable, PyTorch ops are used'}")
sys.exit(0)
