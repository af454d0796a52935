"""Wong–Kolter dual network (Wong & Kolter 2018, §3): sound bounds on ``c^T f(x')`` by weak duality.

Notation follows the paper: the dual network ``ν_k = −c``, ``ν̂_i = W_iᵀ ν_{i+1}`` (eq. 22), ReLU layers
with pre-activation bounds ``l ≤ ẑ ≤ u`` split into ``I⁻, I⁺, I``, and the objective ``J`` of eq. 23.
In code we propagate ``ω = −ν`` (so ``ω_k = c``): for fixed α this is the linearised network run
backwards, and it gives the lower and upper bound of a row in one pass.

Modules, bottom up:
- ``relu``: the fixed slopes (eq. 27), the unstable units I (one gather) and their terms in J;
- ``patches``, ``columns``: blocks of forward columns (receptive-field patches along conv chains);
- ``projections``: random projections of the ℓ1/ℓ2 terms (Wong et al. 2018b; ``proj=k``, NOT sound);
- ``backward``: backward rows, eqs. 22–23, and :func:`dual_objective`;
- ``frontier``, ``skips``: Algorithm 1's forward columns, sequential and with skip connections;
- ``intermediate``: Algorithm 1, :func:`intermediate_bounds` (per layer the cheaper of advancing the
  forward frontier and backward rows that jump through it; ``strategy`` keeps the pure routes);
- ``chunked``: the exact intermediate bounds in chunks of columns, over several devices;
- ``alpha``: :func:`optimize_alpha`, projected gradient ascent on α (the final objective only);
- ``unit_patches``: backward rows of conv units as receptive-field patches (α on the windows);
- ``tight``: the intermediate slopes (fixed / adaptive / best) and tight mode's layer-by-layer ascent;
- ``splits``: :func:`split_dual`, branch-and-bound subdomains: split multipliers β with α, batched;
- ``bounder``: :class:`DualBounder`.
Every route evaluates the same formula, so they agree to rounding.
"""
from .alpha import optimize_alpha
from .backward import dual_objective
from .bounder import FINAL_ALPHA_ONLY, DualBounder
from .chunked import column_chunked_bounds
from .intermediate import intermediate_bounds
from .relu import relu_slopes, relu_terms
from .splits import split_dual

__all__ = ["DualBounder", "FINAL_ALPHA_ONLY", "intermediate_bounds", "dual_objective", "optimize_alpha",
           "column_chunked_bounds", "relu_slopes", "relu_terms", "split_dual"]
