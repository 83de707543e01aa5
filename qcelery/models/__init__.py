"""Built-in models: numpy ridge (``LinearModel``) and LightGBM (``LGBModel``, optional extra)."""

from .base import Model
from .gbdt import LGBModel, lightgbm_available
from .linear import LinearModel

__all__ = ["Model", "LinearModel", "LGBModel", "lightgbm_available"]
