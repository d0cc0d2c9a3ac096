"""Sweep the confidence threshold of adaptive drafting (`--draft-len auto`) on the built-in prompts.

    python evals/auto_threshold.py            # default model, shipped exits; prints speedup vs full mode

Each line: threshold, exit, speedup over `full` mode timed in the same process, acceptance of the drafts
that were verified, drafts per generated token. Results of the run that set AUTO_MIN_CONFIDENCE are in
evals/results/auto_threshold_sweep_cpu.txt.
"""

from balspec.measure.prompts import load_prompts
import balspec
import balspec.engine.speculative as speculative


def run(bm, prompts, **kwargs):
    bm.generate(prompts[0], max_new_tokens=16, **kwargs)  # warm-up
    seconds = tokens = accepted = drafted = 0
    for ids in prompts:
        out = bm.generate(ids, max_new_tokens=128, **kwargs)
        seconds, tokens = seconds + out.stats.seconds, tokens + len(out.token_ids)
        accepted, drafted = accepted + (out.stats.accepted or 0), drafted + (out.stats.drafted or 0)
    return tokens / seconds, accepted / max(drafted, 1), drafted / tokens


def main():
    bm = balspec.load()
    prompts = [bm.encode(p.text) for p in load_prompts(None, 7).prompts]
    base = run(bm, prompts, mode="full")[0]
    print("full", round(base, 1), "tokens/s", flush=True)
    for threshold in (0.4, 0.6, 0.8):
        speculative.AUTO_MIN_CONFIDENCE = threshold
        for exit_layer in (8, 12, 16, 24):
            tps, acceptance, per_token = run(bm, prompts, mode="speculative", exit=exit_layer, draft_len="auto")
            print("thr", threshold, "e", exit_layer, "speedup", round(tps / base, 3), "acc", round(acceptance, 3),
                  "drafts/token", round(per_token, 2), flush=True)


if __name__ == "__main__":
    main()
