"""lowbit.engine.kernels: the op registry and its backends.

Importing this package registers every backend (torch reference, CPU packed ops, Triton); call
`dispatch(op, ...)` to run an op on the best backend for its arguments.
"""
from . import (attention_backend, attention_quantized_reference, attention_reference,  # noqa: F401
               cpu_packed, elementwise_backend, elementwise_reference, reference,
               triton_backend)  # (importing registers the backends)
from .registry import (BackendUnavailable, backends, chosen, dispatch, force_backend, register,
                       use_backend)

__all__ = ["BackendUnavailable", "backends", "chosen", "dispatch", "force_backend", "register",
           "use_backend"]
