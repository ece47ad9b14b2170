"""Benchmark: one relevance map of the paper's network at 1x1x128x96x96, measured side by side in one process.

    python benchmarks/lrp_speed.py [--repeats 5] [--device cpu|cuda] [--threads 2] [--skip-references] [--quick]

Methods: plain forward, forward+backward (autograd gradient of the target logit), this engine (a1b0, a2b1,
epsilon_a2b1, and 3 presets from one traced forward), one map of each zennit-named preset (epsilon_plus,
epsilon_plus_flat, epsilon_gamma_box, their bias-free ``_nobias`` variants; a1b0 and a2b1 for comparison) computed
from an existing trace (``trace = LRP(net).trace(x)`` made untimed before each run, then ``trace.relevance(preset)``
timed; its memory is above the trace's), zennit (a2b1, a1b0; BN folded by zennit's canonizer) and captum (its LRP,
alpha1beta0 rules set by hand; it has no defaults for Conv3d/AvgPool3d/BatchNorm3d).
Prints the median time of ``--repeats`` runs, the ratio to the forward pass and the peak extra memory
(CPU: peak RSS above the level before the call, via /proc, with glibc's mmap threshold fixed so that freed
tensors leave the process; CUDA: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from scripts.evaluation.profiling import measure_call, reexec_with_returning_malloc  # noqa: E402
from scripts.lrp import LRP  # noqa: E402
from scripts.lrp.layers import bn_folded_copy  # noqa: E402
from scripts.runtime.network import PretermCNN  # noqa: E402


def measure(fn, device, repeats):
    fn()  # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        out, seconds, peak = measure_call(fn, device)
        times.append(seconds)
        peaks.append(peak)
        del out
    return statistics.median(times), max(peaks)


FROM_TRACE = ("a1b0", "a2b1", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus_nobias",
              "epsilon_plus_flat_nobias", "epsilon_gamma_box_nobias")
FROM_TRACE_LABEL = "this engine {} from an existing trace"


def measure_prepared(prepare, fn, device, repeats, baseline):
    """As :func:`measure`, for ``fn(prepare())`` where only ``fn`` is timed (``prepare`` runs before each call).
    Also returns the median over the runs of ``fn``'s time / the time of ``baseline()`` run just before it, which
    follows load changes on a shared machine better than a ratio of two medians taken minutes apart."""
    fn(prepare())  # warm-up
    times, peaks, ratios = [], [], []
    for _ in range(repeats):
        arg = prepare()
        base, base_seconds, _ = measure_call(baseline, device)
        del base
        out, seconds, peak = measure_call(functools.partial(fn, arg), device)
        times.append(seconds)
        peaks.append(peak)
        ratios.append(seconds / base_seconds)
        del out, arg
    return statistics.median(times), max(peaks), statistics.median(ratios)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-references", action="store_true", help="only this engine and the baselines")
    parser.add_argument("--quick", action="store_true",
                        help="only the baselines and the maps from an existing trace; memory measured in this process")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_only:
        reexec_with_returning_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = PretermCNN().to(device).eval()
    x = torch.randn(1, 1, 128, 96, 96, device=device)
    target = 1
    rows = []

    def forward():
        with torch.no_grad():
            return net(x)

    def forward_backward():
        xg = x.clone().requires_grad_(True)
        out = net(xg)
        (grad,) = torch.autograd.grad(out[:, target].sum(), xg)
        return grad

    lrp = LRP(net)
    rows.append(("forward", *measure(forward, device, args.repeats)))
    rows.append(("forward+backward (gradient)", *measure(forward_backward, device, args.repeats)))
    def three_presets():
        trace = lrp.trace(x)
        return [trace.relevance(p, target).relevance for p in ("a1b0", "a2b1", "a3b2")]

    if not args.quick:
        for preset in ("a1b0", "a2b1", "epsilon_a2b1"):
            rows.append((f"this engine {preset}", *measure(lambda p=preset: lrp(x, p, target), device, args.repeats)))
        rows.append(("this engine a1b0+a2b1+a3b2, one forward", *measure(three_presets, device, args.repeats)))
    paired = {}  # from-trace rows: median of (time / a forward pass timed just before)
    def one_map(trace, preset):
        return trace.relevance(preset, target).relevance

    for preset in FROM_TRACE:
        timed = functools.partial(one_map, preset=preset)
        seconds, peak, paired[preset] = measure_prepared(lambda: lrp.trace(x), timed, device, args.repeats, forward)
        rows.append((FROM_TRACE_LABEL.format(preset), seconds, peak))

    if not (args.skip_references or args.quick):
        from zennit_oracle import import_zennit

        if import_zennit() is not None:
            from zennit.attribution import Gradient
            from zennit.canonizers import SequentialMergeBatchNorm
            from zennit.composites import LayerMapComposite, layer_map_base
            from zennit.rules import AlphaBeta
            from zennit.types import Convolution, Linear

            for alpha, beta in ((2, 1), (1, 0)):
                rule = AlphaBeta(alpha, beta)
                comp = LayerMapComposite(layer_map_base() + [(Convolution, rule), (Linear, rule)],
                                         canonizers=[SequentialMergeBatchNorm()])
                zen_net = copy.deepcopy(net)

                def zennit_map(comp=comp, zen_net=zen_net):
                    with Gradient(model=zen_net, composite=comp) as attributor:
                        _, rel = attributor(x, torch.eye(2, device=device)[[target]])
                    return rel

                rows.append((f"zennit a{alpha}b{beta}", *measure(zennit_map, device, args.repeats)))
        try:
            from captum.attr import LRP as CaptumLRP
            from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, IdentityRule

            cap_net = bn_folded_copy(net)
            for m in cap_net.modules():
                if isinstance(m, (nn.Conv3d, nn.Linear)):
                    m.rule = Alpha1_Beta0_Rule()
                elif isinstance(m, nn.AvgPool3d):
                    m.rule = EpsilonRule(epsilon=1e-6)
                elif isinstance(m, (nn.Flatten, nn.Identity)):
                    m.rule = IdentityRule()
            cap = CaptumLRP(cap_net)
            rows.append(("captum a1b0 (BN folded by hand)",
                         *measure(lambda: cap.attribute(x, target=target), device, args.repeats)))
        except Exception as err:  # captum missing or failing: say so, keep the other numbers
            print(f"captum skipped: {type(err).__name__}: {err}", file=sys.stderr)

    if args.memory_only:
        print(json.dumps({label: mem for label, _, mem in rows}))
        return
    if device.type == "cpu" and not args.quick:
        # peak memory from a second process where glibc returns freed tensors to the OS at once (fixed mmap
        # threshold); timings stay from this process, whose allocator is left as users have it
        child = subprocess.run([sys.executable, __file__, "--memory-only", "--repeats", "2",
                                *(["--threads", str(args.threads)] if args.threads else []),
                                *(["--skip-references"] if args.skip_references else [])],
                               capture_output=True, text=True, check=True)
        peaks = json.loads(child.stdout.strip().splitlines()[-1])
        rows = [(label, t, peaks.get(label, mem)) for label, t, mem in rows]
    fwd = rows[0][1]
    fb_mem = rows[1][2]
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads")
    print(f"\nLRP benchmark: PretermCNN (8,16,32,64,64), input 1x1x128x96x96, {device.type} ({name}), "
          f"torch {torch.__version__}, median of {args.repeats}\n")
    print("| method | time (s) | x forward | peak extra memory (MB) | x forward+backward memory |")
    print("|---|---|---|---|---|")
    for label, t, mem in rows:
        print(f"| {label} | {t:.3f} | {t / fwd:.2f} | {mem / 2**20:.0f} | {mem / max(fb_mem, 1):.2f} |")
    by = {label: t for label, t, _ in rows}
    ratios = ", ".join(f"{p} {paired[p]:.2f}" for p in FROM_TRACE)
    print(f"\none map from an existing trace, x a forward pass timed just before each run (median of "
          f"{args.repeats}; goal for the zennit-named presets: <= 2): {ratios}")
    if "zennit a2b1" in by:
        print(f"\nzennit a2b1 / this engine a2b1: {by['zennit a2b1'] / by['this engine a2b1']:.2f}x")
    if "captum a1b0 (BN folded by hand)" in by:
        print(f"captum a1b0 / this engine a1b0: {by['captum a1b0 (BN folded by hand)'] / by['this engine a1b0']:.2f}x")


if __name__ == "__main__":
    main()
