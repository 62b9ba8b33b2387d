"""Benchmarks: speed as ratios measured in one run, against references outside the code they judge.

Not part of the installed package: `pipeline bench` runs `bench.figures` from a checkout, and
`bench/device-check.sh` is the one-shot check on a CUDA machine (docs/performance.md has the figures).
"""
