"""Compares `exitgraph forward` outputs with a fixture's reference tensors.

  python3 scripts/compare_outputs.py REFERENCE.safetensors OURS.safetensors DTYPE

Every tensor in both files but the inputs is compared. f32 must be within 1e-4 (absolute),
as on the CPU. Half precision computes every op in 16-bit floats, so its error grows with the
values and with depth: the check is relative, max |ours - reference| <= 16 u max |reference|
per tensor, where u is the unit roundoff (bf16: 2^-8, 8 significant bits; f16: 2^-11). That
allows a few roundings per layer on the tiny fixtures (2 to 6 layers) and still fails a
wrong op, which is off by the order of the values themselves. Greedy tokens must be equal
in f32; in half precision their agreement is printed (near-ties of random tiny models can
flip). Prints one line per tensor; exits 1 if any check fails.
"""

import sys

import numpy as np
from safetensors.numpy import load_file

INPUTS = {"input_ids", "attention_mask", "token_type_ids"}
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "f16": 2.0**-11}


def main():
    ref_path, ours_path, dtype = sys.argv[1:4]
    ref, ours = load_file(ref_path), load_file(ours_path)
    failed = 0
    compared = 0
    for name in sorted(set(ref) & set(ours) - INPUTS):
        r, o = ref[name], ours[name]
        if r.shape != o.shape:
            print(f"FAIL {name}: shape {o.shape}, reference {r.shape}")
            failed += 1
            continue
        compared += 1
        if name == "greedy":
            agree = float(np.mean(r == o))
            ok = dtype != "f32" or agree == 1.0
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {agree:.1%} of tokens equal")
        else:
            diff = float(np.max(np.abs(o.astype(np.float64) - r.astype(np.float64))))
            if dtype == "f32":
                limit = 1e-4
            else:
                limit = 16 * UNIT_ROUNDOFF[dtype] * float(np.max(np.abs(r)))
            ok = bool(np.isfinite(diff)) and diff <= limit
            print(f"{'ok  ' if ok else 'FAIL'} {name}: max |diff| {diff:.3e} (limit {limit:.3e})")
        failed += not ok
    if compared == 0:
        print("FAIL: no tensor in common")
        failed += 1
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
