#!/usr/bin/env python3
"""The RoPE base a context length needs, after Men et al. (2024), "Base of RoPE Bounds
Context Length" (arXiv 2405.14591).

With RoPE, a query's expected preference for a key equal to it over a random key, at a
relative distance m, is proportional to

    B(m) = sum over i in 0 .. d/2 - 1 of cos(m * base^(-2i/d))

(d: the head dimension). The paper's condition for a context of L positions is B(m) >= 0
for every m in 1..=L: where B(m) turns negative, a query prefers random keys at that
distance to the one that matches it, and no amount of training on that length fixes it.

Prints, for the head dimension and context given, the first distance where B turns
negative for each base of a grid, and the smallest base of the grid that keeps B
non-negative up to the context.

    python3 scripts/rope_base_bound.py --head-dim 32 --context 2048
"""

import argparse
import math


def b(m: int, base: float, head_dim: int) -> float:
    """B(m): the sum of cos(m * theta_i) over the head's frequency pairs."""
    return sum(math.cos(m * base ** (-2.0 * i / head_dim)) for i in range(head_dim // 2))


def first_negative(base: float, head_dim: int, up_to: int):
    """The first distance m in 1..=up_to with B(m) < 0, or None."""
    for m in range(1, up_to + 1):
        if b(m, base, head_dim) < 0:
            return m
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--context", type=int, default=2048)
    args = p.parse_args()
    if args.head_dim < 2 or args.head_dim % 2:
        p.error("--head-dim must be even and at least 2")
    if args.context < 1:
        p.error("--context must be at least 1")

    # Self-checks by hand: B(0) counts the pairs; with one pair B is cos(m).
    assert b(0, 1e4, args.head_dim) == args.head_dim // 2
    assert abs(b(3, 1e4, 2) - math.cos(3)) < 1e-12
    assert first_negative(1e4, 2, 10) == 2  # cos(1) > 0, cos(2) < 0

    grid = [m * 10.0**e for e in range(3, 9) for m in (1, 2, 3, 5)]
    print(f"head dim {args.head_dim}, context {args.context}")
    print("| base | first m with B(m) < 0 | min B over 1..=context |")
    print("|---:|---:|---:|")
    smallest = None
    for base in grid:
        m = first_negative(base, args.head_dim, 4 * args.context)
        low = min(b(k, base, args.head_dim) for k in range(1, args.context + 1))
        shown = "none up to %d" % (4 * args.context) if m is None else str(m)
        print(f"| {base:.0e} | {shown} | {low:.2f} |")
        if smallest is None and (m is None or m > args.context):
            smallest = base
    print(f"smallest base of the grid with B >= 0 up to {args.context}: {smallest:.0e}")


if __name__ == "__main__":
    main()
