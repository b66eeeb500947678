"""Reports of a run: report.json, the per-layer table and the plots.

Everything here reads a run directory (or the in-memory equivalent); ``nestsynth
report RUN_DIR`` redraws the plots from the files alone.
"""

from .summary import (build_report, write_run_outputs, load_run_model, save_model, load_model, read_history,
                      read_report)
from .tables import format_layer_table, format_outcome
from .plots import plot_connections, plot_input_growth, redraw_plots

__all__ = ["build_report", "write_run_outputs", "load_run_model", "save_model", "load_model",
           "read_history", "read_report", "format_layer_table", "format_outcome", "plot_connections",
           "plot_input_growth", "redraw_plots"]
