"""The `balspec` command line: parse flags, call the library, hand results to the reporter.

Results go to stdout, progress and logs to stderr. A user's mistake prints one line and exits 1.
"""

from __future__ import annotations

import sys

import typer

from balspec.errors import BalspecError

# options of both generate and bench
STATIC_CACHE = typer.Option(False, "--static-cache", help="Static-shape passes: K/V written by index, attention over "
                            "the whole cache under a position mask (what --compile needs).")
COMPILE = typer.Option(None, "--compile", help="Static shapes, and each decode step, draft step and verify captured "
                       "once per shape: 'cuda-graphs' (CUDA only: the eager kernels as a CUDA graph; milliseconds) or "
                       "'reduce-overhead' (torch.compile: inductor's kernels, CUDA graphs on a GPU; minutes to compile).")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-speculative decoding with Balcony exits: train, generate, bench, export.")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt (a user message: the chat template is applied unless --raw)."),
    mode: str | None = typer.Option(None, "--mode", help="full | early-exit | speculative "
                                    "(default: the measured default recorded with the exits)."),
    exit_layer: int | None = typer.Option(None, "--exit", help="Exit layer to draft with (or to stop at in early-exit)."),
    draft_len: str | None = typer.Option(None, "--draft-len", help="Draft tokens per cycle, or 'auto' "
                                         "(stop drafting when the draft is unsure: its top probability at "
                                         "temperature max(T, 1) below 0.6; at most 8)."),
    draft_width: int | None = typer.Option(None, "--draft-width", help="Greedy only: also verify the exit's "
                                           "2nd..Nth choices for the first drafted token, in the same pass."),
    lookup_len: int | None = typer.Option(None, "--lookup-len", help="Where the last 2-4 tokens occurred earlier in "
                                          "the prompt or output, verify up to this many tokens that followed them "
                                          "instead of drafting with the exit (prompt lookup; 0: never; default: "
                                          "recorded with the exits, else 0)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy; > 0 samples (exactly the full model's "
                                      "distribution in speculative mode)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: all)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed for sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    model: str | None = typer.Option(None, "--model", help="Base model: hub id, local directory or tiny-random "
                                     "(default: the embedded SmolLM2-135M-Instruct)."),
    exits_path: str | None = typer.Option(None, "--exits-path", help="Exits checkpoint directory "
                                          "(default: the exits shipped for the default model)."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    show_drafts: bool = typer.Option(False, "--show-drafts", help="Colour accepted drafts green and show "
                                     "rejected drafts struck through in red."),
    compare: bool = typer.Option(False, "--compare", help="Also run full mode on the prompt (speculative mode when "
                                 "the chosen mode is full): report the speedup "
                                 "and whether the outputs are identical."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (text, token ids, stats)."),
    full_draft_head: bool = typer.Option(False, "--full-draft-head", help="Draft with the full LM head even when the "
                                         "exits store a reduced draft vocabulary (same output, slower drafts)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    logits_dtype: str = typer.Option("model", "--logits-dtype", help="The full model's LM head in the "
                                     "model's dtype ('model', default) or 'float32' (bf16/fp16 models)."),
    layer_path: str = typer.Option("auto", "--layer-path", help="How decoder layers run: auto (balspec's lean "
                                   "forward where a check at start shows it exact, else generic), lean or generic "
                                   "(the model's own layer modules)."),
    static_cache: bool = STATIC_CACHE,
    compile: str | None = COMPILE,
) -> None:
    """Generate text with the full model, an exit's sub-model, or speculatively (exact full-model output).

    Text streams to stdout; acceptance rate, tokens per cycle and tokens/s go to stderr.

    Examples:

        balspec generate "What is the capital of France?"

        balspec generate "Write a haiku about rain." --mode speculative --exit 12 --draft-len 4 --show-drafts

        balspec generate "Name three rivers." --mode speculative --exit 8 --draft-len auto --draft-width 3

        balspec generate "Tell me a story." --temperature 0.8 --top-p 0.95 --seed 0 --json

        balspec generate "Summarise: ..." --mode early-exit --exit 16 --compare
    """
    import json

    from balspec import stream
    from balspec.engine.graphs import check_compile
    from balspec.generate import load

    check_compile(compile)  # before the model loads
    bm = load(model=model, exits=exits_path, dtype=dtype, device=device, draft_vocab=not full_draft_head,
              logits_dtype=logits_dtype, layer_path=layer_path, static_cache=static_cache, compile=compile)
    kwargs = dict(mode=mode, exit=exit_layer, draft_len=draft_len, draft_width=draft_width, lookup_len=lookup_len,
                  max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, chat=not raw, stop=stop)
    if compare:  # warm both modes up first, so neither timing includes one-time costs (allocation, kernels)
        for warm_mode in {kwargs["mode"] or bm.defaults["mode"], "full", "speculative" if bm.exits else "full"}:
            bm.generate(prompt, **{**kwargs, "mode": warm_mode, "max_new_tokens": 8})
    streamer = None if as_json else stream.TokenStreamer(bm.tokenizer, show_drafts, stop)
    out = bm.generate(prompt, on_cycle=streamer, **kwargs)
    if streamer is not None:
        streamer.finish(out.text)
    baseline = None
    if compare and out.stats.mode == "full" and bm.exits:  # show what speculation does here; full stays the reference
        out, baseline = bm.generate(prompt, **{**kwargs, "mode": "speculative"}), out
    elif compare:
        baseline = bm.generate(prompt, **{**kwargs, "mode": "full"})
    if as_json:
        doc = out.to_dict()
        if baseline is not None:
            doc["baseline"] = baseline.stats.to_dict()
            doc["speedup"] = out.stats.tokens_per_second / baseline.stats.tokens_per_second
            doc["identical_to_full"] = out.token_ids == baseline.token_ids
        print(json.dumps(doc, allow_nan=False))
        return
    stream.print_generation_stats(out.stats, baseline.stats if baseline else None,
                                  None if baseline is None else out.token_ids == baseline.token_ids)


@app.command()
def export(
    exit_layer: int = typer.Option(..., "--exit", help="The exit to export (one the checkpoint holds)."),
    output: str = typer.Option(..., "--output", "-o", help="Directory to write: absent or empty, unless --force."),
    model: str | None = typer.Option(None, "--model", help="Base model: hub id, local directory or tiny-random "
                                     "(default: the embedded SmolLM2-135M-Instruct)."),
    exits_path: str | None = typer.Option(None, "--exits-path", help="Exits checkpoint directory "
                                          "(default: the exits shipped for --model)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --output that holds an earlier export."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype of the export: float32, bfloat16 or float16."),
) -> None:
    """Export the sub-model of one exit as a standard Hugging Face checkpoint.

    The sub-model (embedding, trunk layers 1..E, the balcony layer, its norm as the final norm, the shared
    head) is written with the tokenizer, chat template and generation config. Plain transformers loads it,
    so it serves as a draft model (vLLM, SGLang, llama.cpp, transformers assisted generation) or on its
    own as a fixed-budget model. Prints the output directory.

    Examples:

        balspec export --exit 8 --output smollm2-exit8

        balspec export --exit 12 --exits-path runs/exits --output draft12 --dtype bfloat16 --force
    """
    from balspec.checkpoint import exit_kinds, load_exits, read_meta
    from balspec.exits import no_sub_model_error
    from balspec.export import check_output, export_submodel
    from balspec.info import resolve_exits_path
    from balspec.models import load_model, parse_dtype

    path = resolve_exits_path(exits_path, model)
    meta = read_meta(path)  # the cheap checks first: loading the model can take a while
    if exit_layer not in meta["exits"]:
        have = ",".join(map(str, meta["exits"]))
        raise BalspecError(f"--exit: {path} has no exit {exit_layer} (it has {have})")
    kinds = exit_kinds(meta)
    if kinds[exit_layer] == "draft":
        raise no_sub_model_error(exit_layer, "export", [e for e, kind in kinds.items() if kind == "sub-model"])
    check_output(output, force)
    parse_dtype(dtype)
    hf_model, tokenizer = load_model(model, dtype)
    exits, _ = load_exits(hf_model, path)
    print(export_submodel(hf_model, tokenizer, exits, exit_layer, output, force))


@app.command()
def info(
    exits_path: str | None = typer.Option(None, "--exits-path", help="Exits checkpoint directory "
                                          "(default: the exits shipped for --model)."),
    model: str | None = typer.Option(None, "--model", help="Base model to check the checkpoint against "
                                     "(loads it); without it nothing is checked and no model is loaded."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON document instead of a table."),
) -> None:
    """Show what an exits checkpoint holds.

    The base model it was trained on and its fingerprints, the exits, parameters per exit, norm and layer
    init, dtype, checksum and the training summary; with --model, also whether the engine runs that model's
    layers with balspec's lean forward or the generic path: a table, or one JSON document with --json.

    Examples:

        balspec info

        balspec info --exits-path runs/exits --json

        balspec info --exits-path runs/exits --model default
    """
    import json

    from rich.console import Console

    from balspec.info import describe_checkpoint, render_table, resolve_exits_path
    from balspec.models import load_model

    path = resolve_exits_path(exits_path, model)
    hf_model = load_model(model)[0] if model is not None else None
    description = describe_checkpoint(path, hf_model)
    if as_json:
        print(json.dumps(description, indent=2, default=str, allow_nan=False))
    else:
        Console().print(render_table(description))


@app.command()
def bench(
    exits: str | None = typer.Option(None, "--exits", help="Exit layers to measure, e.g. 8,12,16 "
                                     "(default: every exit in the checkpoint)."),
    model: str | None = typer.Option(None, "--model", help="Base model: hub id, local directory or tiny-random "
                                     "(default: the embedded SmolLM2-135M-Instruct)."),
    exits_path: str | None = typer.Option(None, "--exits-path", help="Exits checkpoint directory "
                                          "(default: the exits shipped for --model)."),
    draft_len: str = typer.Option("4", "--draft-len", help="Draft length(s) in speculative mode: 4 or 2,4,6,auto."),
    draft_width: str = typer.Option("1", "--draft-width", help="Draft width(s), greedy only: 1 (a chain) or 1,3 "
                                    "(also verify the exit's 2nd..Nth choices for the first position)."),
    lookup_len: str = typer.Option("0", "--lookup-len", help="Prompt lookup in speculative mode: 0 (exit drafts "
                                   "only) or 0,4 (also with up to 4 drafts read from the context where it repeats)."),
    prompts: str | None = typer.Option(None, "--prompts", help="Prompt file: Spec-Bench jsonl, jsonl with "
                                       "\"prompt\" (and \"category\"), or one prompt per line "
                                       "(default: the built-in set)."),
    num_prompts: int | None = typer.Option(None, "--num-prompts",
                                           help="Use at most this many prompts, spread over categories."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy: every output must equal the baseline's."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs of the first prompt per setting."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed; prompt i uses seed + i."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Decode exactly --max-new-tokens per prompt."),
    no_early_exit: bool = typer.Option(False, "--no-early-exit", help="Skip the early-exit (sub-model alone) runs."),
    peers: str = typer.Option("", "--peers",
                              help="Also time transformers' generate(): hf,hf-early-exit,prompt-lookup."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON document instead of tables."),
    output: str | None = typer.Option(None, "--output", help="Also write the JSON document to this file."),
    plot: str | None = typer.Option(None, "--plot", help="Write a PNG of speedup and tau per exit (needs matplotlib)."),
    full_draft_head: bool = typer.Option(False, "--full-draft-head", help="Draft with the full LM head even when the "
                                         "exits store a reduced draft vocabulary (same output, slower drafts)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    logits_dtype: str = typer.Option("model", "--logits-dtype", help="The full model's LM head in the "
                                     "model's dtype ('model', default) or 'float32' (bf16/fp16 models)."),
    layer_path: str = typer.Option("auto", "--layer-path", help="How decoder layers run: auto (balspec's lean "
                                   "forward where a check at start shows it exact, else generic), lean or generic "
                                   "(the model's own layer modules)."),
    static_cache: bool = STATIC_CACHE,
    compile: str | None = COMPILE,
) -> None:
    """Measure acceptance, tokens per cycle (tau) and wall-clock speedup per exit and draft length.

    The same prompts run in full mode (the baseline), in speculative mode for every exit and draft length,
    in early-exit mode per exit and, with --peers, through transformers' own generate(). Greedy speculative
    outputs must equal the baseline's token for token: the mismatch column counts prompts where they do not.
    Beside each measured speedup stand the pass costs, the cost-model bound and the engine's efficiency.

    Examples:

        balspec bench --exits 8,12,16 --num-prompts 12

        balspec bench --draft-len 2,4,6,auto --prompts spec_bench_questions.jsonl --json --output bench.json

        balspec bench --exits 8 --draft-len 1,auto --draft-width 1,3 --no-early-exit

        balspec bench --exits 12 --peers hf,hf-early-exit,prompt-lookup --plot bench.png

        balspec bench --exits 8 --layer-path generic --json --output bench-generic.json

        balspec bench --exits 8,12 --draft-len 1,2,4 --device cuda --dtype bfloat16 --compile cuda-graphs

        balspec bench --exits 8 --draft-len 1 --lookup-len 0,4 --no-early-exit
    """
    import shlex

    from balspec.checkpoint import exit_kinds, read_meta
    from balspec.engine.graphs import check_compile
    from balspec.engine.speculative import parse_layer_path
    from balspec.exits import parse_exits
    from balspec.files import check_output_file
    from balspec.generate import load
    from balspec.info import resolve_exits_path
    from balspec.measure import bench as bench_lib
    from balspec.measure import report
    from balspec.measure.prompts import load_prompts
    from balspec.models import check_device, parse_dtype

    # the cheap checks first: loading the model and measuring can take minutes
    path = resolve_exits_path(exits_path, model)
    meta = read_meta(path)
    available = meta["exits"]
    chosen = parse_exits(exits) if exits else list(available)
    if not exits and (static_cache or compile):  # draft-kind exits run only with the dynamic cache: bench the rest
        sub_model = [e for e, kind in exit_kinds(meta).items() if kind == "sub-model"]
        chosen = sub_model or chosen  # none: check_options refuses in one line
    bench_lib.check_exits(chosen, available)
    draft_lens = bench_lib.parse_draft_lens(draft_len)
    draft_widths = bench_lib.parse_draft_widths(draft_width, temperature)
    lookup_lens = bench_lib.parse_lookup_lens(lookup_len)
    peer_names = bench_lib.parse_peers(peers)
    parse_dtype(dtype)
    check_device(device)
    parse_layer_path(layer_path)
    check_compile(compile)
    if output:
        check_output_file(output, "--output")
    if plot:
        report.require_matplotlib()
        check_output_file(plot, "--plot")
    opts = bench_lib.BenchOptions(exits=chosen, draft_lens=draft_lens, draft_widths=draft_widths, lookup_lens=lookup_lens,
                                  max_new_tokens=max_new_tokens,
                                  temperature=temperature, warmup=warmup, seed=seed, peers=peer_names,
                                  eos=not ignore_eos, early_exit=not no_early_exit)
    bench_lib.check_numbers(opts)
    prompt_set = load_prompts(prompts, num_prompts)
    bm = load(model=model, exits=path, dtype=dtype, device=device, draft_vocab=not full_draft_head,
              logits_dtype=logits_dtype, layer_path=layer_path, static_cache=static_cache, compile=compile)
    bench_lib.check_options(bm, opts)
    with report.progress_bar() as on_step:
        result = bench_lib.run_bench(bm, prompt_set, opts, command=shlex.join(["balspec", *sys.argv[1:]]),
                                     exits_checkpoint=str(path), on_step=on_step)
    if as_json:  # the results first: a file that cannot be written (a full disk) loses nothing measured
        print(report.to_json(result))
    else:
        report.print_tables(result)
    if output:
        report.write_json(result, output)
    if plot:
        report.plot(result, plot)

@app.command()
def train(
    recipe: str | None = typer.Option(None, "--recipe", help="YAML recipe (see recipes/); --set and flags override it."),
    method: str | None = typer.Option(None, "--method", help="balcony (train balconies on the frozen base) or "
                                      "sorted (Sorted Fine-Tuning: the whole model, shared-head exits) (method)."),
    model: str | None = typer.Option(None, "--model", help="Base model: hub id, local directory, default or "
                                     "tiny-random (model.name)."),
    exits: str | None = typer.Option(None, "--exits", help="Exit layers, e.g. 8,12,16 (exits.layers)."),
    data: str | None = typer.Option(None, "--data", help="Training text: a .txt/.jsonl/.parquet file, directory, "
                                    "glob or hub dataset name (data.train)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Optimizer steps (train.max_steps)."),
    output: str | None = typer.Option(None, "--output", "-o", help="Run directory (train.output)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its latest checkpoint "
                                "(from step 0 with its recorded config if it has none yet)."),
    overrides: list[str] = typer.Option([], "--set", help="Set any config key, e.g. --set optim.lr=3e-4 "
                                        "(repeatable; see the recipes for the keys)."),
) -> None:
    """Train balcony exits by self-distillation to the frozen full model.

    Only the balconies train (AdamW, cosine schedule); the loss is
    KL(full || exit) at every position, summed over exits. With
    --method sorted (SoFT) the whole model trains instead, its exits
    sharing the final norm and head; OUTPUT is then also a model
    directory (--model OUTPUT loads it with its exits). Runs in one
    process by default, and under `accelerate launch` with DDP, FSDP or
    DeepSpeed from your accelerate config. Progress goes to stderr, metrics
    to OUTPUT/metrics.jsonl, resumable checkpoints to OUTPUT/checkpoints/,
    the final exits to OUTPUT (use them with --exits-path OUTPUT).
    Prints the output directory.

    Examples:

        balspec train --recipe recipes/tiny.yaml --output runs/tiny

        balspec train --recipe recipes/smollm2-135m.yaml --max-steps 200 --set optim.lr=3e-4

        balspec train --model default --exits 8,12,16 --data notes.txt --output runs/notes

        balspec train --output runs/tiny --resume

        balspec train --recipe recipes/tiny.yaml --method sorted --output runs/tiny-soft

        accelerate launch -m balspec.cli train --recipe recipes/llama3-8b.yaml
    """
    from balspec.exits import parse_exits
    from balspec.training.run import configure
    from balspec.training.train import train as run_training

    flags = {"method": method, "model.name": model, "exits.layers": parse_exits(exits) if exits is not None else None,
             "data.train": data, "train.max_steps": max_steps, "train.output": output}
    config, checkpoint = configure(recipe, overrides, flags, resume)
    print(run_training(config, checkpoint))


@app.command("cache-teacher")
def cache_teacher(
    blocks: int = typer.Option(..., "--blocks", help="Training blocks to cache (data.block_size tokens each), drawn "
                               "at random (train.seed) from the recipe's data.train."),
    output: str = typer.Option(..., "--output", "-o", help="Cache directory: new, empty, or this same cache to "
                               "continue it."),
    recipe: str | None = typer.Option(None, "--recipe", help="YAML recipe whose model and data the cache is for."),
    model: str | None = typer.Option(None, "--model", help="Base model (model.name)."),
    data: str | None = typer.Option(None, "--data", help="Training text (data.train)."),
    overrides: list[str] = typer.Option([], "--set", help="Set any config key, as for `balspec train`."),
) -> None:
    """Run the frozen full model once over training blocks and store its final hidden states.

    `balspec train --set data.teacher_cache=OUTPUT` then trains on those
    blocks without running the teacher: each step runs only the trunk up to
    the deepest exit (2 of 30 layers for a draft exit at layer 2), so more
    epochs of self-distillation fit in an hour. The cache takes 4 x hidden
    bytes per token (2.3 KB for SmolLM2-135M: 1M tokens, 2.3 GB). Resumable:
    run the same command again to continue. Prints the cache directory.
    Caches of several files train as their union: list them all in
    data.teacher_cache, with data.train naming exactly those files.

    Examples:

        balspec cache-teacher --recipe recipes/smollm2-135m-draft.yaml --blocks 4000 --output runs/cache-corpus

        balspec train --recipe recipes/smollm2-135m-draft.yaml --set data.teacher_cache=runs/cache-corpus

        balspec train --recipe recipes/smollm2-135m-draft-answers5.yaml \
            --set data.teacher_cache=runs/cache-self6-bf16,runs/cache-self7-bf16,runs/cache-self8-bf16
    """
    from balspec.training.config import resolve_config
    from balspec.training.teacher_cache import build_cache

    config = resolve_config(recipe, overrides, {"model.name": model, "data.train": data})
    print(build_cache(config, output, blocks))


def main() -> None:
    try:
        app()
    except BalspecError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: launched processes printing together do not interleave
        sys.stderr.flush()
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
