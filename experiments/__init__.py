"""The experiments: each a module with ``main(argv=None)`` and ``--help``, run as ``python -m experiments.<name>``.

``demo``, ``toy2d`` (+ ``toy2d_plots``), ``tightness``, ``mnist_table`` and ``benchmark`` (its parts in
``benchmark_exact``, ``benchmark_scaling``, ``benchmark_skip``; part h measures each setting in a fresh
process through ``measure_memory``, an entry point of its own). ``vnncomp`` is the VNN-COMP interface
(``prepare``/``run``/``bench``; bench's part in ``vnncomp_bench``), called by the wrapper scripts in
``vnncomp/``. Shared: ``cli`` (the parser base with the common options and the one quick mode, the result
store at ``<out>/results.sqlite``, tables, timing) and ``trained`` (networks the experiments train themselves). The maths and the evaluation loops live in the
library (``polytope_lab.evaluation``, ``polytope_lab.checks``, ``polytope_lab.store``).
"""
