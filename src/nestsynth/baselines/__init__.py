"""The methods NeST is measured against, and NeST itself, run in one harness.

Each method is registered by name with its own config (a dataclass, TOML section
``[methods.NAME]``; NeST reads the top-level sections) and a run function
``run(ctx, mcfg) -> model`` of a :class:`~nestsynth.run_context.RunContext`; see
:mod:`nestsynth.baselines.registry`.  :func:`~nestsynth.baselines.runner.run_method`
runs any of them into a run directory with the same ``report.json``; :func:`prune` is
the Python API for it (any registered model, or any ``torch.nn.Module``).
"""

from .registry import NEST, Method, get_method, list_methods, method_names, register_method
from . import _modules  # noqa: F401  (importing registers every method; after the registry)
from ..api import prune

__all__ = ["NEST", "Method", "get_method", "list_methods", "method_names", "register_method", "prune"]
