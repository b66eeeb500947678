"""nestsynth: synthesize compact neural networks with NeST's grow-and-prune paradigm.

Dai, Yin, Jha, "NeST: A Neural Network Synthesis Tool Based on a Grow-and-Prune
Paradigm".  The data flow is seed -> grow -> prune -> compact model:
:mod:`nestsynth.seeds`, :mod:`nestsynth.growth`, :mod:`nestsynth.pruning`,
:mod:`nestsynth.sparse`, sequenced by :mod:`nestsynth.synthesis`.
"""

__version__ = "0.1.0"

from . import baselines  # noqa: F401  (registers every method and its [methods.NAME] config section)
from .api import synthesize
from .baselines import prune
from .config import Config
from .errors import NestError
from .registry import get_model, list_models
from .report import load_model, save_model
from .sparse import SparseMLP

__all__ = ["synthesize", "prune", "Config", "NestError", "get_model", "list_models", "load_model",
           "save_model", "SparseMLP", "__version__"]
