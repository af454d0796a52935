"""Complete verification by branch and bound on the dual network with split multipliers β (β-CROWN-style).

- ``search``: the best-first search over subdomains (ReLU splits or input boxes), batched bounding,
  BaBSR branching, relaxation minimisers as counterexample candidates;
- ``leaves``: the PGD attack on ``max_k (A_k f − b_k)`` and the exact LP of a fully split subdomain;
- ``bounder``: :class:`BaBBounder`, registered as "bab" (``bound``, ``certify``, ``find_point``).
The β-dual itself is :func:`polytope_lab.dual.split_dual`; the maths and the guarantee: docs/bab.md.
"""
from .bounder import BaBBounder
from .search import BOUND_TOL, Search, Settings

__all__ = ["BaBBounder", "Search", "Settings", "BOUND_TOL"]
