"""What a pass over more rows costs: every matrix of the default model (trunk and LM head, fp32) times 1..8
rows, in the engine's few-row form (W @ x^T, balspec/engine/skinny.py, here without its padding of 1 and 3 rows)
and as nn.Linear computes it (x @ W^T).

A decode step streams all weights once, so on a CPU one row and a few rows should cost about the same; how
far a machine's BLAS is from that decides what a verify pass over k + width rows costs against a full step
(the cost model in `balspec bench`), and so whether chains and siblings can pay.

    python evals/matmul_rows.py --output evals/results/matmul_rows_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from balspec.models import device_name, load_model

FORMS = {"W @ x^T": lambda w, x: torch.mm(w, x.T), "x @ W^T (F.linear)": lambda w, x: F.linear(x, w)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,3,4,5,6,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", help="write the medians as JSON here")
    args = parser.parse_args()
    model, _ = load_model(None, "float32", "cpu")
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    results = {}
    with torch.inference_mode():
        for form, fn in FORMS.items():
            for rows in map(int, args.rows.split(",")):
                inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
                times = []
                for _ in range(args.repeats + 2):
                    t0 = time.perf_counter()
                    for w in weights:
                        fn(w, inputs[w.shape[1]])
                    times.append(time.perf_counter() - t0)
                ms = statistics.median(times[2:]) * 1e3
                results[f"{form}, rows={rows}"] = ms
                print(f"{form:20s} rows={rows}: {ms:6.1f} ms")
    if args.output:
        doc = {"command": shlex.join(["python", *sys.argv]), "device": device_name("cpu"),
               "matrices": len(weights), "parameters": sum(w.numel() for w in weights),
               "median_ms_all_matrices": results}
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
