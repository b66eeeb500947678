"""The methods NeST is measured against, run in the same harness.

Each method is registered by name with its own config dataclass (TOML section
``[methods.NAME]``) and a run function ``run(ctx, mcfg) -> SparseMLP``; see
:mod:`nestsynth.baselines.registry` and :class:`~nestsynth.baselines.context.MethodContext`.
:func:`~nestsynth.baselines.runner.run_method` runs any of them (or NeST itself)
into a run directory with the same ``report.json`` as a synthesis; :func:`prune` is the
Python API for it (any registered model, or any ``torch.nn.Module``).
"""

from .registry import NEST, Method, get_method, list_methods, method_names, register_method
from . import _modules  # noqa: F401  (importing registers every method; after the registry)
from .runner import prune

__all__ = ["NEST", "Method", "get_method", "list_methods", "method_names", "register_method", "prune"]
