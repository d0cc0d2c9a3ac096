"""Measurements (`balspec bench`): acceptance rate, tokens per cycle (tau) and wall-clock speedup per exit
against `full` mode and the peers in the same run (`bench`), the cost model's pass costs (`costs`), the prompt
sets (`prompts`, the built-in set in `prompts/builtin.jsonl`) and the tables, JSON and plots (`report`).
"""
