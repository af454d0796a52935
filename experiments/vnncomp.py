"""The VNN-COMP interface: ``python -m experiments.vnncomp prepare|run|bench``.

* ``prepare <category> <onnx> <vnnlib>``: load and convert the network, parse the property, open an
  onnxruntime session; exit 0, or 1 with the reason on stderr.
* ``run <category> <onnx> <vnnlib> <results_file> <timeout>`` (the runner's arguments after its version
  word): verify with :func:`polytope_lab.pipeline.verify_property` and write the results file: its first
  line ``sat``, ``unsat``, ``timeout``, ``unknown`` or ``error``; after ``sat`` the counterexample
  ``((X_0 v) … (Y_0 v) …)``, X in the ONNX input's C order, Y computed by onnxruntime on that X. Before a
  ``sat`` is written, X (as written, in the input's dtype) is checked to lie in its case's box, Y to be
  onnxruntime's output and one disjunct to hold on that Y (no tolerance); a failed check writes
  ``unknown``. The timeout counts from the process start (interpreter and imports included); a watchdog
  writes ``timeout`` and exits just before it, should a stage overrun its budget. Any exception writes
  ``error`` (reason on stderr, exit 0).
* ``bench <instances.csv>``: every instance of the list (``onnx,vnnlib,timeout`` relative to the CSV's
  folder or ``--root``) for each configuration, rows in the result store as they finish (a rerun skips
  them), a per-instance table, a summary (verdict counts, median seconds, deciding stages) and the cactus
  plot (instances decided against time).
"""
from __future__ import annotations

import time

_T0 = time.monotonic()   # before the heavy imports: they count against the instance's timeout

import argparse  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402

from experiments.vnncomp_instance import (CONFIGS, VERDICTS, Instance, Outcome, budget, load_instance,  # noqa: E402,F401
                                          results_text, solve, witness, write_results)

#: the subcommands parsed without ``bench``'s parser (whose imports, pandas and torch, take seconds)
LIGHT_COMMANDS = ("run", "prepare")
#: the watchdog fires this long before the timeout
WATCHDOG_SECONDS = 0.2


def process_age() -> float:
    """Seconds since this process started (Linux /proc; else since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), time.monotonic() - _T0)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _T0


class Watchdog:
    """Writes ``timeout`` to the results file ``seconds`` from now and exits the process (``hard_exit``;
    else the answer that comes later is dropped), unless :meth:`finish` wrote the answer first (one lock:
    never both, never a torn file)."""

    def __init__(self, path, seconds: float, hard_exit: bool = True):
        self.path, self.lock, self.done, self.hard_exit = path, threading.Lock(), False, hard_exit
        self.backstop = backstop(path, seconds + WATCHDOG_SECONDS / 2) if hard_exit else None
        self.timer = threading.Timer(max(seconds, 0.0), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self):
        with self.lock:
            if self.done:
                return
            self.done = True
            write_results(self.path, results_text("timeout"))
            print("vnncomp run: the watchdog stopped the run at the timeout", file=sys.stderr, flush=True)
            if self.hard_exit:
                os._exit(0)

    def finish(self, text: str):
        with self.lock:
            if not self.done:
                self.done = True
                self.timer.cancel()
                write_results(self.path, text)
                if self.backstop is not None:
                    os.close(self.backstop)   # the backstop process sees the pipe close and exits


def backstop(path, seconds: float) -> int:
    """The last resort behind the watchdog thread (which needs the GIL, which a long C call may hold): a
    forked process that, ``seconds`` from now, kills this one (SIGKILL) and writes ``timeout``, unless the
    returned pipe end is closed first (or this process ends) — then it just exits. Returns that pipe end."""
    parent = os.getpid()
    r, w = os.pipe()
    if os.fork() == 0:                                   # the child: only os calls from here on
        try:
            os.close(w)
            ready, _, _ = select.select([r], [], [], max(seconds, 0.0))
            if not ready:
                os.kill(parent, signal.SIGKILL)
                write_results(path, "timeout\n")
                os.write(2, b"vnncomp run: the backstop killed the run at the timeout\n")
        finally:
            os._exit(0)
    os.close(r)
    return w


def cmd_run(args) -> int:
    """``run``: the clock starts at ``args.started`` (time.monotonic(); the process start when run as a
    script, where the watchdog also exits the process)."""
    timeout = float(args.timeout)
    age = lambda: time.monotonic() - args.started  # noqa: E731
    dog = Watchdog(args.results_file, timeout - age() - WATCHDOG_SECONDS, hard_exit=args.hard_exit)
    try:
        inst = load_instance(args.onnx, args.vnnlib)
        out = solve(inst, budget(timeout, age()), args.config, args.seed, args.threads)
        dog.finish(out.text)
        print(f"{out.verdict} (stage {out.stage}, {age():.2f} s in all) {out.message}".rstrip(), file=sys.stderr)
    except Exception as e:  # the contract: any failure is an "error" result, exit 0
        dog.finish(results_text("error"))
        print(f"vnncomp run: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    try:
        inst = load_instance(args.onnx, args.vnnlib)
    except Exception as e:
        print(f"vnncomp prepare: {args.onnx}, {args.vnnlib}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"prepared {args.category}: {inst.network.input_size} inputs, {inst.network.output_size} outputs, "
          f"{len(inst.prop)} case(s)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- the parser


def positive_seconds(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"a finite number of seconds, got {text!r}")
    return value


def subparser(experiment: bool = False, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser: the experiments' :class:`~experiments.cli.ExperimentParser` for ``bench``."""
    if experiment:
        from experiments.cli import ExperimentParser
        return ExperimentParser(**kwargs)
    return argparse.ArgumentParser(**kwargs)


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The parser; ``with_bench=False`` leaves out ``bench``, whose imports (pandas, torch: seconds) would
    otherwise delay ``run``'s watchdog."""
    parser = argparse.ArgumentParser(prog="python -m experiments.vnncomp", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,run,bench}",
                                parser_class=subparser)
    prep = sub.add_parser("prepare", help="load the network and parse the property once (fail early)",
                          description="Load and convert the ONNX network, parse the VNN-LIB property, open an "
                                      "onnxruntime session; exit 0, or 1 with the reason on stderr.")
    run = sub.add_parser("run", help="verify one instance and write the results file",
                         description="Verify one instance within the timeout (counted from the process start) "
                                     "and write the VNN-COMP results file; exit 0 whatever the verdict.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for p in (prep, run):
        p.add_argument("category", help="the benchmark category (informational)")
        p.add_argument("onnx", help="the ONNX network")
        p.add_argument("vnnlib", help="the VNN-LIB property")
    run.add_argument("results_file", help="where the result goes")
    run.add_argument("timeout", type=positive_seconds, help="seconds, from the process start")
    run.add_argument("--config", choices=sorted(CONFIGS), default="default", help="pipeline configuration")
    run.add_argument("--seed", type=int, default=0, help="the attack's seed")
    run.add_argument("--threads", type=int, default=None, help="solver threads (None: the solver's own)")
    prep.set_defaults(func=cmd_prepare)
    run.set_defaults(func=cmd_run)
    if with_bench:
        from experiments import vnncomp_bench
        vnncomp_bench.add_parser(sub)
    return parser


def main(argv=None, started: float | None = None, hard_exit: bool = False) -> int:
    """The command line; ``started``: when ``run``'s clock started (time.monotonic(); default: now);
    ``hard_exit``: ``run``'s watchdog exits the process at the timeout (as a script)."""
    started = time.monotonic() if started is None else started
    argv = sys.argv[1:] if argv is None else list(argv)
    light = bool(argv) and argv[0] in LIGHT_COMMANDS      # run/prepare: no need for bench's parser and imports
    args = build_parser(with_bench=not light).parse_args(argv)
    args.started, args.hard_exit = started, hard_exit
    return args.func(args)


if __name__ == "__main__":
    code = main(started=time.monotonic() - process_age(), hard_exit=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # skips the interpreter's teardown (torch's takes ~1 s), which would count against the timeout
