"""The input contract of an exported model: what one input sample must look like.

Every artifact records it (the ``.pt`` dict and its architecture's ``meta``, the
safetensors metadata, the ONNX ``metadata_props``, the C file's comment and
``#define`` lines), so the model can be fed without the training code.  The scaling
and normalization are those of the loaders in :mod:`nestsynth.data`, which this
module names and, where the loader keeps them as constants, imports.
"""

from __future__ import annotations

from ..data.cifar10 import CIFAR10_MEAN, CIFAR10_STD

#: Per data set: (pixel scaling, per-channel mean, per-channel std, where it is defined).
#: mean / std None: no normalization after the scaling.
PREPROCESSING = {
    "mnist": ("uint8 pixel / 255 (range [0, 1], 0 = background)", None, None,
              "nestsynth.data.mnist._to_dataset"),
    "digits": ("scikit-learn digit value (0..16) / 16 (range [0, 1])", None, None,
               "nestsynth.data.digits.load_digits"),
    "cifar10": ("uint8 pixel / 255, then (x - mean[c]) / std[c] per RGB channel", list(CIFAR10_MEAN),
                list(CIFAR10_STD), "nestsynth.data.cifar10.to_dataset"),
}


def input_contract(dataset: str | None, sample_shape) -> dict:
    """The contract of a model trained on ``dataset`` with samples of ``sample_shape``.

    Returns:
        ``{"shape", "layout", "dtype", "dataset", "scaling", "mean", "std", "defined_in", "note"}``;
        for an unknown or npz data set the scaling says the values are used as stored.
    """
    shape = [int(v) for v in sample_shape]
    key = (dataset or "").lower()
    scaling, mean, std, where = PREPROCESSING.get(key, (
        "none: the values exactly as stored in the training data (npz arrays or a custom set)", None, None,
        "nestsynth.data.npz.load_npz" if key.startswith("npz:") else None))
    layout = "batch first, then " + ("channels, height, width (NCHW)" if len(shape) == 3 else "features")
    note = ("apply exactly this preprocessing and nothing else: no further normalization"
            if mean is None else "apply exactly this preprocessing (scaling, then the per-channel normalization)")
    return {"shape": shape, "layout": layout, "dtype": "float32", "dataset": dataset, "scaling": scaling,
            "mean": mean, "std": std, "defined_in": where, "note": note}


def contract_lines(contract: dict) -> list[str]:
    """The contract as short human-readable lines (the C file's comment block)."""
    lines = [f"input: float32, shape (n, {', '.join(map(str, contract['shape']))}), {contract['layout']}",
             f"data set: {contract['dataset'] or 'unknown'}",
             f"scaling: {contract['scaling']}"]
    if contract["mean"] is not None:
        lines.append(f"normalization: mean {contract['mean']}, std {contract['std']}")
    return lines + [contract["note"]]
