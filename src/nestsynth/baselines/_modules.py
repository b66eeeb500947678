"""Imports every module that registers a method (the order is the listing order)."""

from .. import synthesis  # noqa: F401  nest
from . import magnitude  # noqa: F401  dense, random, han, oneshot, gradual, lottery
from . import saliency  # noqa: F401  snip, grasp
from . import regularized  # noqa: F401  l0, sensitivity
from . import obs  # noqa: F401  lobs
from . import n2ps  # noqa: F401  n2ps
from . import radix  # noqa: F401  radix
