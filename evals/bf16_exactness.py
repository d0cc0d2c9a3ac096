"""Greedy speculative vs greedy `full` in bfloat16: how often does the verify pass break a near-tie differently?

    python evals/bf16_exactness.py --num-prompts 8 --max-new-tokens 64 \
        --output evals/results/bf16_exactness_cpu.json

In fp32 greedy speculative output equals `full` token for token (tested). In bf16 the verify pass runs k + 1
rows at once, and its rounding may differ from a one-row `full` step's; where the two best logits are (nearly)
tied the argmax can flip, and the sequences part. For each logits policy (`--logits-dtype float32`: the LM
head's product in fp32; `model`: in bf16) and each speculative setting this counts the prompts whose output
differs from `full` under the same policy, and first differences per 1000 tokens decoded in agreement (the same
measure as bench's `mismatches_per_1000_tokens`). No timing: safe to run beside other work.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from balspec.measure.bench import agreeing_tokens
from balspec.measure.prompts import load_prompts
from balspec.models import device_name
import balspec

SETTINGS = [(8, 1, 1), (8, 4, 1), (16, 4, 1), (8, "auto", 3)]  # (exit, draft length, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", help="prompt file (default: the built-in set)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--policies", default="float32,model", help="logits dtypes to compare")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args()
    prompts = load_prompts(args.prompts, args.num_prompts).prompts
    result = {"command": shlex.join(["python", *sys.argv]), "dtype": args.dtype, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "torch": torch.__version__, "policies": {}}
    for policy in args.policies.split(","):
        bm = balspec.load(dtype=args.dtype, device=args.device, logits_dtype=policy)
        result["device"] = device_name(bm.device)
        full = [bm.generate(p.text, mode="full", max_new_tokens=args.max_new_tokens).token_ids for p in prompts]
        rows = []
        for exit_layer, k, width in SETTINGS:
            differ, compared, tokens = 0, 0, 0
            for prompt, reference in zip(prompts, full):
                out = bm.generate(prompt.text, mode="speculative", exit=exit_layer, draft_len=k, draft_width=width,
                                  max_new_tokens=args.max_new_tokens).token_ids
                differ += out != reference
                compared += agreeing_tokens(out, reference)
                tokens += len(out)
            rows.append({"exit": exit_layer, "draft_len": k, "draft_width": width, "prompts_differing": differ,
                         "tokens": tokens, "mismatches_per_1000_tokens": 1000 * differ / compared})
            print(f"logits {policy:8s} e{exit_layer} k{k} w{width}: {differ}/{len(prompts)} prompts differ, "
                  f"{rows[-1]['mismatches_per_1000_tokens']:.1f} per 1000 tokens", flush=True)
        result["policies"][policy] = {"full_tokens": sum(map(len, full)), "settings": rows}
        del bm
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
