"""polytope_lab: provable output bounds for ReLU networks (Wong & Kolter 2018) behind one Bounder interface."""
from .attacks import fgsm, pgd, pgd_minimize
from .bounds import Bounder, Bounds, Certification, margin_matrix
from .checks import cross_check
from .data import toy_points
from .dual.chunked import column_chunked_bounds
from .bounds import EstimatedBounds
from .dual import DualBounder, dual_objective, intermediate_bounds
from .interval import IntervalBounder, interval_bounds
from .milp import MILPBounder, MILPBounds
from .verify import AdversarialDistance, certified_radius, minimum_adversarial_distance
from .lp import LPBounder
from .convert import Builder, Expression, from_torch, register_layer, supported_layers, unregister_layer
from .network import Network
from .regions import L2Ball, LinfBall, Region
from .training import eps_schedule, robust_loss, train

__all__ = [
    "fgsm", "pgd", "pgd_minimize",
    "Bounder", "Bounds", "cross_check", "margin_matrix",
    "toy_points",
    "DualBounder", "EstimatedBounds", "column_chunked_bounds", "dual_objective", "intermediate_bounds",
    "IntervalBounder", "interval_bounds",
    "MILPBounder", "MILPBounds", "Certification", "AdversarialDistance", "minimum_adversarial_distance",
    "certified_radius",
    "LPBounder",
    "Network", "from_torch", "register_layer", "unregister_layer", "supported_layers", "Builder", "Expression",
    "L2Ball", "LinfBall", "Region",
    "eps_schedule", "robust_loss", "train",
]
