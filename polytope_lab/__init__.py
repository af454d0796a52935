"""polytope_lab: provable output bounds for ReLU networks (Wong & Kolter 2018) behind one Bounder interface.

The names here are the user API; everything else is importable from its module (``polytope_lab.dual``,
``polytope_lab.milp``, ``polytope_lab.relaxation``, ...). Importing the package registers every backend.
"""
from . import bab, dual, interval, lp, milp  # noqa: F401  (registers "bab", "dual", "interval", "lp", "milp")
from .attacks import fgsm, pgd, pgd_minimize
from .bounds import Bounder, Bounds, Certification, EstimatedBounds, margin_matrix
from .checks import cross_check
from .convert import from_torch, register_layer
from .network import Network
from .pipeline import verify_property
from .regions import Box, L2Ball, LinfBall, Region
from .training import robust_loss, train
from .verify import certified_radius, minimum_adversarial_distance
from .vnnlib import read_vnnlib

__all__ = [
    "Box", "LinfBall", "L2Ball", "Region",
    "Bounder", "Bounds", "EstimatedBounds", "Certification", "margin_matrix",
    "cross_check", "certified_radius", "minimum_adversarial_distance",
    "fgsm", "pgd", "pgd_minimize",
    "robust_loss", "train",
    "Network", "from_torch", "register_layer",
    "load_onnx", "read_vnnlib", "verify_property", "verify_dataset",
]


def __getattr__(name):
    """``load_onnx`` and ``verify_dataset`` on first use: importing the onnx package or dask.distributed
    costs a fraction of a second."""
    if name == "load_onnx":
        from .onnx import load_onnx
        return load_onnx
    if name == "verify_dataset":
        from .dataset import verify_dataset
        return verify_dataset
    raise AttributeError(f"module 'polytope_lab' has no attribute {name!r}")
