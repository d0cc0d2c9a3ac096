"""The training loop: self-distil balconies on a frozen base model under accelerate.

The run directory's layout and checks are in run.py.
Checkpoints are written to a hidden temp directory and renamed into place, so none is ever half-written;
temp files a killed run left are removed by the next start. The directory may be moved or copied and resumed
where it is. Everything a user can get wrong is checked before the first file is written.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from balspec.checkpoint import init_exits_from, read_draft_vocab, read_meta, save_exits
from balspec.errors import BalspecError
from balspec.exits import Exits, attach_exits, model_parts, with_control_tokens
from balspec.files import writing
from balspec.generate import control_token_ids
from balspec.models import load_model
from balspec.training.config import TrainingConfig
from balspec.training.data import Batch, CachedBlocks, load_blocks
from balspec.training.loss import Distiller, ExitLosses, next_token_labels, teacher_forward, trunk_forward
from balspec.training.run import (
    CHECKPOINTS,
    METRICS_FILE,
    RunProgress,
    append_metrics,
    checkpoints,
    launched_processes,
    run_directory,
    training_record,
    truncate_metrics,
)
from balspec.training.sorted import BaseDistiller, frozen_copy, load_base, needs_original, save_base, trains_base
from balspec.training.teacher_cache import open_cache
from balspec.training.trainstate import load_state, save_state, saved_draft_vocab

log = logging.getLogger(__name__)


def train(config: TrainingConfig, resume_from: Path | None = None) -> Path:
    """Train the balconies of `config.exits.layers` (with the base too under method sorted or exits.train_base:
    sorted.py); returns the run directory holding the final exits (and then the trained model)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    started = time.perf_counter()
    c = config
    accelerator = Accelerator(mixed_precision=c.train.mixed_precision, cpu=c.train.cpu,
                              gradient_accumulation_steps=c.optim.grad_accum)
    if launched_processes() > 1 and accelerator.num_processes == 1:  # else each trains alone, into the same output
        raise BalspecError(f"train.cpu: {launched_processes()} processes were launched but accelerate did not "
                           "join them (no GPU?); to train them together on the CPU add --set train.cpu=true")
    if accelerator.state.deepspeed_plugin is not None:  # no prepared dataloader to infer it from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = c.optim.batch_size
    set_seed(c.train.seed)
    model, tokenizer = load_model(c.model.name, c.model.dtype, device=accelerator.device)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and c.data.block_size > context:
        raise BalspecError(f"data.block_size: must be at most the model's context of {context} tokens, "
                           f"got {c.data.block_size}")
    parts = model_parts(model)
    base_trains = trains_base(c)
    if base_trains:
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise BalspecError("method sorted / exits.train_base: the base trains in one process or under DDP; "
                               "FSDP and DeepSpeed shard only balconies in balspec")
        original = frozen_copy(model) if needs_original(c) else None
        model.float().requires_grad_(True)  # fp32 master weights; eval mode kept: these models have no dropout
    module = "shared-head" if c.method == "sorted" else c.exits.module
    exits = attach_exits(model, c.exits.layers, c.exits.norm_init, c.exits.layer_init, c.exits.balcony_layers,
                         seed=c.train.seed, draft_exits=c.exits.draft, module=module).float()  # fp32 master weights
    if resume_from is None:
        if c.exits.init_from:
            init_exits_from(exits, model, c.exits.init_from, c.exits.init_exit)
        exits.draft_vocab = starting_draft_vocab(c, model, tokenizer)
    else:  # the checkpoint's weights replace the exits' anyway; its draft vocabulary is the run's
        exits.draft_vocab = saved_draft_vocab(resume_from, model)
    loss_vocab = exits.draft_vocab if c.loss.draft_vocab is not None else None
    blocks, eval_blocks = load_blocks(c.data, tokenizer, c.train.seed, accelerator.process_index,
                                      accelerator.num_processes)  # eval_blocks: all of them, a Batch
    cache = None
    if c.data.teacher_cache is not None:  # its blocks replace data.train's; evaluation still runs the teacher
        cache = open_cache(c.data.teacher_cache, model, c)
        blocks = CachedBlocks(cache, c.train.seed, accelerator.process_index, accelerator.num_processes)

    output = Path(c.train.output)
    with run_directory(output, accelerator, config, resume_from):
        if base_trains:
            distiller = BaseDistiller(model, exits, c.method == "sorted" and c.loss.sorted_target == "ce",
                                      c.loss.ce_weight, c.loss.chunk_size, original)
        else:
            distiller = Distiller(exits, c.loss.ce_weight, c.loss.chunk_size, c.train.gradient_checkpointing,
                                  c.exits.draft_chain, loss_vocab, c.loss.top1_weight)
        optimizer = build_optimizer(distiller, c)
        # Not prepared: a prepared scheduler steps once per process; this one steps once per optimizer step.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(c))
        distiller, optimizer = accelerator.prepare(distiller, optimizer)
        progress = RunProgress()
        if resume_from is not None and base_trains:  # before the optimizer state, which refers to its weights
            load_base(model, resume_from)
        if resume_from is not None:
            load_state(resume_from, accelerator, accelerator.unwrap_model(distiller).exits, optimizer, scheduler,
                       blocks, progress)
        if accelerator.is_main_process:
            truncate_metrics(output / METRICS_FILE, progress.step)  # lines the resumed run logs again
        saved_step = progress.step if resume_from is not None else -1
        resumed_at = progress.step if resume_from is not None else None

        tokens_per_step = c.optim.batch_size * c.data.block_size * c.optim.grad_accum * accelerator.num_processes
        data_info = {"train": c.data.train, "heldout": c.data.heldout, "block_size": c.data.block_size,
                     "train_on": c.data.train_on,
                     "train_blocks": len(blocks) if hasattr(blocks, "__len__") else None,
                     "heldout_blocks": len(eval_blocks), **(cache.info() if cache is not None else {})}
        eval_metrics: dict = {}
        wall_base = progress.wall_seconds

        def elapsed() -> float:
            progress.wall_seconds = wall_base + time.perf_counter() - started
            return progress.wall_seconds

        def record() -> dict:
            elapsed()
            return training_record(config, progress, accelerator, data_info, eval_metrics, resumed_at)

        with progress_bar(accelerator.is_main_process) as bar:
            task = bar.add_task("train", total=c.train.max_steps, completed=progress.step, info="")
            window_tokens, window_seconds = 0, 0.0  # since the last metrics line: tokens/s excludes evals and saves
            while progress.step < c.train.max_steps:
                t0 = time.perf_counter()
                draws = torch.Generator().manual_seed(step_seed(c.train.seed, progress.step,
                                                                accelerator.process_index))
                losses, grad_norm = train_step(model, parts, distiller, optimizer, blocks, accelerator, c, draws)
                scheduler.step()
                kl = dict(zip(exits.exits, accelerator.reduce(losses.kl, "mean").tolist()))
                total = accelerator.reduce(losses.loss, "mean").sum().item()  # what the step minimised
                extra = {} if losses.full_loss is None else {  # the base trains: its CE and the full model's term
                    **{f"ce/{e}": v for e, v in zip(exits.exits, accelerator.reduce(losses.ce, "mean").tolist())},
                    "loss/full": accelerator.reduce(losses.full_loss, "mean").item()}
                total += extra.get("loss/full", 0.0)
                seconds = time.perf_counter() - t0
                progress.step, progress.tokens = progress.step + 1, progress.tokens + tokens_per_step
                progress.train_seconds += seconds
                window_tokens, window_seconds = window_tokens + tokens_per_step, window_seconds + seconds
                lr = scheduler.get_last_lr()[0]
                per_exit = " ".join(f"{e}:{v:.3f}" for e, v in kl.items())
                bar.update(task, completed=progress.step,
                           info=f"kl {per_exit} | {window_tokens / window_seconds:,.0f} tok/s | lr {lr:.2e}")
                last = progress.step == c.train.max_steps
                if last or progress.step % c.train.log_every == 0:
                    append_metrics(accelerator, output, {
                        "step": progress.step, "loss": total, **{f"kl/{e}": v for e, v in kl.items()}, **extra,
                        "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": progress.tokens,
                        "tokens_per_s": window_tokens / window_seconds, "elapsed_s": round(elapsed(), 2)})
                    window_tokens, window_seconds = 0, 0.0
                if len(eval_blocks) and (last or c.train.eval_every and progress.step % c.train.eval_every == 0):
                    eval_metrics = evaluate(model, parts, distiller, eval_blocks, accelerator, c)
                    append_metrics(accelerator, output, {"step": progress.step, **eval_metrics})
                if last or c.train.save_every and progress.step % c.train.save_every == 0:
                    save_checkpoint(accelerator, distiller, optimizer, scheduler, blocks, progress, model, output,
                                    record(), c, tokenizer)
                    saved_step = progress.step
        if len(eval_blocks) and not eval_metrics:  # a finished run resumed: nothing trained, evaluate anyway
            eval_metrics = evaluate(model, parts, distiller, eval_blocks, accelerator, c)
        if saved_step != progress.step:
            save_checkpoint(accelerator, distiller, optimizer, scheduler, blocks, progress, model, output,
                            record(), c, tokenizer)
        final = gathered_exits(accelerator, distiller, model, c)
        if accelerator.is_main_process:
            with writing(f"--output: cannot write the final exits into {output}"):
                if base_trains:  # the model's files first: balspec.json, written last, marks a finished run
                    save_base(model, tokenizer, output)
                save_exits(final, model, output, dtype=parts.head.weight.dtype, training=record(),
                           draft_vocab_info=draft_vocab_info(c, final), train_base=base_trains)
        accelerator.wait_for_everyone()
    return output


def draft_vocab_path(name: str) -> Path:
    """loss.draft_vocab -> the exits directory that holds the vocabulary ("default": the shipped exits)."""
    from balspec.generate import DEFAULT_EXITS_DIR

    return DEFAULT_EXITS_DIR if name == "default" else Path(name)


def starting_draft_vocab(c: TrainingConfig, model, tokenizer) -> torch.Tensor | None:
    """The draft vocabulary [V] (token ids) a new run's exits keep: the one their KL is taken over
    (loss.draft_vocab, with the EOS and chat-control tokens a draft must be able to propose), else the one of the
    checkpoint they continue (exits.init_from), so they draft through the same reduced head as before (the
    shipped exits' 8,195 rows instead of the whole vocabulary) while their KL stays over every token; else None."""
    if c.loss.draft_vocab is not None:
        vocab = read_draft_vocab(model, draft_vocab_path(c.loss.draft_vocab), "loss.draft_vocab")
        return with_control_tokens(vocab, control_token_ids(model, tokenizer))
    if c.exits.init_from and read_meta(c.exits.init_from).get("draft_vocab") is not None:
        return read_draft_vocab(model, c.exits.init_from, "exits.init_from")
    return None


def draft_vocab_info(c: TrainingConfig, exits: Exits) -> dict | None:
    """balspec.json's record of the draft vocabulary the exits keep (its size is added on save): the one they were
    trained over (loss.draft_vocab) or the one of the checkpoint they continue (exits.init_from)."""
    if c.loss.draft_vocab is not None:
        return {"source": f"loss.draft_vocab: {c.loss.draft_vocab}"}
    if exits.draft_vocab is not None:
        return {"source": f"exits.init_from: {c.exits.init_from}"}
    return None


def step_seed(seed: int, step: int, process: int) -> int:
    """The seed of one step's random draws on one process: a resumed run draws what the uninterrupted one did,
    whatever else used torch's global generator in between."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{process}".encode()).digest()[:8], "little")


def train_step(model, parts, distiller, optimizer, blocks, accelerator, c: TrainingConfig,
               draws: torch.Generator | None = None):
    """One optimizer step over grad_accum batches. Returns (mean ExitLosses, grad norm or None).
    draws: the step's random draws (draft-kind exits' unverified rows)."""
    loss = kl = ce = agree = 0.0
    full_loss = None
    grad_norm = None
    for _ in range(c.optim.grad_accum):
        batch = blocks.next_batch(c.optim.batch_size).to(accelerator.device)  # [batch, block]
        with accelerator.accumulate(distiller):
            losses = distill_batch(model, parts, distiller, batch, accelerator, c, draws=draws)
            accelerator.backward(losses.loss.sum() + (losses.full_loss if losses.full_loss is not None else 0))
            if accelerator.sync_gradients and c.optim.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(distiller.parameters(), c.optim.grad_clip)
            optimizer.step()  # accelerate skips these until the last batch of the step
            optimizer.zero_grad(set_to_none=True)
        loss, kl, ce, agree = loss + losses.loss.detach(), kl + losses.kl, ce + losses.ce, agree + losses.agree
        if losses.full_loss is not None:
            full_loss = losses.full_loss.detach() + (full_loss if full_loss is not None else 0)
    n = c.optim.grad_accum
    return ExitLosses(loss / n, kl / n, ce / n, agree / n,
                      full_loss=None if full_loss is None else full_loss / n), grad_norm


def distill_batch(model, parts, distiller, blocks: Batch, accelerator, c: TrainingConfig,
                  first_drafts: bool = False, draws: torch.Generator | None = None) -> ExitLosses:
    """The teacher's no-grad forward, then the balconies and their losses on one batch [batch, block].
    first_drafts: draft-kind exits are scored as a cycle's first draft at every position (evaluation)."""
    if trains_base(c):  # the model's own forward, with gradients (sorted.py)
        with accelerator.autocast():
            return distiller(blocks.input_ids, blocks.loss_mask)
    input_ids = blocks.input_ids
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)  # [batch, seq]
    with accelerator.autocast():
        if blocks.teacher_hidden is not None:  # a teacher cache's block: the trunk up to the deepest exit only
            teacher_hidden, trunk = blocks.teacher_hidden, trunk_forward(model, input_ids, sorted(c.exits.layers))
        else:
            teacher_hidden, trunk = teacher_forward(model, input_ids, sorted(c.exits.layers))
        arch = accelerator.unwrap_model(distiller).exits.arch
        with torch.no_grad():  # a balcony rotates as the base's last layer (Gemma 3: its kind's own base)
            position_embeddings = arch.rotary(parts.rotary, trunk[0], position_ids, arch.balcony_kind)
        labels = next_token_labels(input_ids) if c.loss.ce_weight > 0 else None
        stats = (blocks.teacher_lse, blocks.teacher_top) if blocks.teacher_lse is not None else None
        return distiller(trunk, position_embeddings, teacher_hidden, parts.head, labels, blocks.loss_mask,
                         first_drafts, draws, stats)


def evaluate(model, parts, distiller, eval_blocks: Batch, accelerator, c: TrainingConfig) -> dict:
    """Per-exit KL and top-1 agreement with the full model on the held-out blocks (over the positions the
    loss counts), shared among processes."""
    sums = torch.zeros(3, len(c.exits.layers), device=accelerator.device)  # kl, agree, positions
    mine = eval_blocks[accelerator.process_index::accelerator.num_processes]
    with torch.no_grad():
        for start in range(0, len(mine), c.optim.batch_size):
            batch = mine[start:start + c.optim.batch_size].to(accelerator.device)  # [batch, block]
            losses = distill_batch(model, parts, distiller, batch, accelerator, c, first_drafts=True)
            sums += torch.stack([losses.kl, losses.agree, torch.ones_like(losses.kl)]) * losses.positions
    sums = accelerator.reduce(sums, "sum")
    kl, agree = (sums[:2] / sums[2].clamp(min=1)).tolist()
    layers = sorted(c.exits.layers)
    return {**{f"eval/kl/{e}": v for e, v in zip(layers, kl)}, **{f"eval/top1/{e}": v for e, v in zip(layers, agree)}}


def build_optimizer(distiller: Distiller, c: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the balconies only; no weight decay on norms."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.optim.lr, betas=(c.optim.beta1, c.optim.beta2), eps=c.optim.eps)


def cosine_schedule(c: TrainingConfig):
    """Learning-rate factor per step: linear warmup, then cosine down to min_lr_ratio at max_steps."""
    warmup, total, floor = c.optim.warmup_steps, c.train.max_steps, c.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))

    return factor


def save_checkpoint(accelerator, distiller, optimizer, scheduler, blocks, progress: RunProgress, model,
                    output: Path, training: dict, c: TrainingConfig, tokenizer=None) -> Path:
    """An exits checkpoint and the state that resumes training from it (trainstate.py), written to a temp
    directory and renamed into place; with the trained model (and `tokenizer`) when the base trains. A write
    that fails (a full disk) stops the run in one line; the partial is removed by the next start."""
    root = output / CHECKPOINTS
    final, partial = root / f"step-{progress.step:07d}", root / f".step-{progress.step:07d}.partial"
    with writing(f"--output: cannot write the checkpoint {final}"):
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_state(partial, accelerator, optimizer, scheduler, blocks, progress)
        exits = gathered_exits(accelerator, distiller, model, c)
        accelerator.wait_for_everyone()  # every process's part is in `partial` before it is renamed
        if accelerator.is_main_process:
            if trains_base(c):
                save_base(model, tokenizer, partial)
            save_exits(exits, model, partial, training=training, draft_vocab_info=draft_vocab_info(c, exits),
                       train_base=trains_base(c))
            os.replace(partial, final)  # configure refused a `final` that balspec did not write
            for old in checkpoints(output)[:-c.train.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
    return final


def gathered_exits(accelerator, distiller, model, c: TrainingConfig) -> Exits | None:
    """The full (unsharded) exits on the main process; every process must call it."""
    state = accelerator.get_state_dict(distiller)
    if not accelerator.is_main_process:
        return None
    if accelerator.num_processes == 1 or trains_base(c):  # DDP (the only launch training the base) replicates
        return accelerator.unwrap_model(distiller).exits
    exits = attach_exits(model, c.exits.layers, c.exits.norm_init, c.exits.layer_init, c.exits.balcony_layers,
                         draft_exits=c.exits.draft)
    exits.load_state_dict({k.removeprefix("exits."): v for k, v in state.items()})
    exits.draft_vocab = accelerator.unwrap_model(distiller).exits.draft_vocab
    return exits


def progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


