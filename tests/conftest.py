import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

# Without a GPU, Triton kernels run in its CPU interpreter. Triton reads this variable once, when
# it is first imported, and importing lowbit.engine.kernels imports it: so it is set here, before
# any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
