"""Time one decode step of the default model through transformers' decoder layers and through balspec's
own layer forward (`balspec/engine/layers.py`), interleaved so that machine load hits both alike, for 1-4 rows;
with --compile, also balspec's layer forward under torch.compile.

    python evals/layer_forward.py --repeats 30 --output evals/results/layer_forward_cpu.json

Both run the same weights over balspec's KV cache (same masks, same rotary tables, and the same matrix-product
form: where the engine chose the few-row form, the transformers layers' nn.Linear modules get it too for this
measurement); only the per-call path differs. Prints the median milliseconds per step and writes them as JSON with --output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from balspec.engine import layers, skinny
from balspec.engine.layers import decoder_layer, module_layer
from balspec.models import device_name
import balspec

PROMPT = "Explain in three sentences why the sky is blue."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", default="1,2,3,4", help="rows per step (a verify pass runs several)")
    parser.add_argument("--output", help="write the medians as JSON here")
    parser.add_argument("--compile", action="store_true",
                        help="also time balspec's layer forward under torch.compile (inductor, dynamic shapes)")
    args = parser.parse_args()
    bm = balspec.load()
    engine = bm.engine
    if engine.skinny:  # the engine installs it on the head only; its layers call engine.linear directly
        skinny.install([engine.parts.layers], engine.linear)
    ids = bm.encode(PROMPT)
    start = len(ids)
    slots = range(engine.num_layers)

    def transformers_layers(hidden, rows):
        for layer in engine.parts.layers:
            rope, mask = rows.views["full_attention"]
            hidden = module_layer(layer, hidden, rope, mask, engine.cache)
        return hidden

    def balspec_layers(hidden, rows):
        for layer in engine.parts.layers:
            rope, mask = rows.views["full_attention"]
            hidden = decoder_layer(layer, hidden, rope, mask, engine.cache, engine.linear)
        return hidden

    paths = {"transformers": transformers_layers, "balspec": balspec_layers}
    if args.compile:  # the layer forward around the cache update, compiled (inductor, dynamic shapes)
        def before_cache(layer, hidden, rope):
            x = layers.rms_norm(layer.input_layernorm, hidden)
            return layers._key_value(layer.self_attn, x, rope, engine.linear), \
                layers._query(layer.self_attn, x, rope, engine.linear)

        def after_cache(layer, hidden, query, key, value, mask):
            return layers._attend_and_mlp(layer, hidden, query, key, value, mask, engine.linear)

        before, after = torch.compile(before_cache, dynamic=True), torch.compile(after_cache, dynamic=True)

        def compiled_layers(hidden, rows):
            for layer in engine.parts.layers:
                rope, mask = rows.views["full_attention"]
                (key, value), query = before(layer, hidden, rope)
                key, value = engine.cache.update(key, value, layer.self_attn.layer_idx)
                hidden = after(layer, hidden, query, key, value, mask)
            return hidden

        paths["balspec+compile"] = compiled_layers
    times = {(name, n): [] for name in paths for n in map(int, args.rows.split(","))}
    with torch.inference_mode():
        engine.reset(start + 8)
        engine.prefill(torch.tensor([ids]), "full", None)
        token = torch.tensor([ids[-1:]])
        for _ in range(args.repeats + 2):
            for name, n in times:
                rows = engine.rows(start, n)
                t0 = time.perf_counter()
                engine.full_logits(paths[name](engine.embed(token.expand(1, n)), rows)).argmax(-1).tolist()
                times[name, n].append(time.perf_counter() - t0)
                engine.cache.rollback(slots, start)
    medians = {f"{name} rows={n}": statistics.median(t[2:]) * 1e3 for (name, n), t in times.items()}
    for key, ms in medians.items():
        print(f"{key:22s} {ms:6.1f} ms")
    if args.output:
        doc = {"command": "python evals/layer_forward.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                       if v is not None),
               "device": device_name("cpu"),
               "skinny_matmul": engine.skinny, "torch": torch.__version__, "median_ms_per_step": medians}
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
