"""DMLNet: DeepLabV3+ with a metric-learning head and fixed class prototypes (Cen et al., ICCV 2021)."""

from lightning_modules.dmlnet.functional import *  # noqa: F403  (the pure functions)
from lightning_modules.dmlnet.functional import __all__ as _functional_all
from lightning_modules.dmlnet.lightning_model import DMLNetSegmenter
from lightning_modules.dmlnet.loss import dce_loss, dmlnet_loss, variance_loss
from lightning_modules.dmlnet.torch_model import PrototypeHead

__all__ = [*_functional_all, "DMLNetSegmenter", "PrototypeHead", "dce_loss", "dmlnet_loss", "variance_loss"]

# Checkpoints and configs name the class by this public path, not by the file that defines it.
DMLNetSegmenter.__module__ = __name__
