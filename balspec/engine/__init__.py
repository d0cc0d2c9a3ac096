"""The decoding engine: balspec's own run of a frozen causal LM's layers over one pre-allocated KV cache.

`speculative.Engine` runs ranges of decoder layers and the balconies, and does the speculative cycle (draft a
chain or a small tree at an exit, verify it with layers e+1..N from the buffered exit states, accept, roll
back). Beside it: the cache (`cache`), the layer forwards (`layers`, `architecture`: what a model family needs
beyond its modules), few-row matrix products on the CPU (`skinny`), the draft tree's rows and masks (`tree`),
and logits processing, greedy acceptance and rejection sampling (`sampling`). DESIGN.md section 3 states the
algorithm.
"""
