"""User errors → one line on stderr and exit status 1, never a traceback."""
from __future__ import annotations

import click
import torch

from lowbit.engine.device_limits import DeviceLimitsError
from lowbit.engine.evaluate import EvaluationError
from lowbit.engine.generate import ContextTooLongError, EmptyPromptError
from lowbit.engine.kernels.registry import BackendUnavailable
from lowbit.engine.kv_cache import KVCacheError
from lowbit.engine.load import LoadError
from lowbit.engine.plot import PlotError, PlotUnavailable
from lowbit.engine.profile import ProfileError
from lowbit.engine.sampling import SamplingError
from lowbit.engine.tokenizer import TokenizerError
from lowbit.quant.architecture import UnsupportedModelError
from lowbit.quant.bnb import BnbUnavailable
from lowbit.quant.checkpoint import CheckpointError
from lowbit.quant.config import QuantConfigError
from lowbit.quant.formats import FormatError
from lowbit.quant.sources import ModelSourceError
from lowbit.quant.text import TextError

# Every exception lowbit raises for bad input or an impossible request.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ContextTooLongError, EmptyPromptError, BackendUnavailable, KVCacheError, LoadError,
    SamplingError, TokenizerError, UnsupportedModelError, CheckpointError, QuantConfigError,
    FormatError, ModelSourceError, TextError, EvaluationError, DeviceLimitsError, PlotError,
    PlotUnavailable, ProfileError, BnbUnavailable)


class LowbitGroup(click.Group):
    """A click group whose commands report user errors and out-of-memory as one clear line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except torch.OutOfMemoryError:
            raise click.ClickException(
                "out of GPU memory: try int4 weights (--weights int4), a smaller KV cache "
                "(--kv 8 or 4), fewer new tokens, or --device cpu") from None
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None
