"""The serving runtime.

Without an accelerator, Triton kernels run only in Triton's interpreter, which is chosen when a
kernel is defined (at import): decide here, before any kernel module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
