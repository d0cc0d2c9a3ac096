"""Training the base model itself: Sorted Fine-Tuning (method sorted) and unfrozen balconies (exits.train_base).

SoFT (Kavehzadeh et al. 2024, "Sorted LLaMA") has no balconies: the whole model trains so that for each exit e,
trunk layers 1..e + the final norm + the shared LM head is a sub-model of its own (a shared-head exit, exits.py).
Its loss is the sum over the exits and the last layer of each sub-model's next-token cross-entropy
(loss.sorted_target ce, SoFT's own) or KL to the original full model (kl, plus ce_weight x CE). With
exits.train_base the balconies train with the base; every exit's term and the full model's own are KL to the
original (+ ce_weight x CE), so the full model is held near what it was while the trunk serves the exits.

The original full model, where a loss needs it, is a frozen copy taken before training (else the metrics compare
with the current full model). The head and the loss run on chunks of positions under activation checkpointing:
a sub-model's [chunk, vocab] logits are made again in the backward pass instead of being kept, so memory holds
the reference's log-probabilities ([positions, vocab] fp32 per batch) and a chunk of logits at a time, and the
gradient reaches the head too.

Output: the run directory (and each checkpoint) is also a Hugging Face model directory (config.json,
model.safetensors, tokenizer) holding the trained base, its exits beside it (balspec.json: train_base true);
`balspec generate --model OUTPUT` loads both.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from balspec.errors import BalspecError
from balspec.exits import Exits, model_parts
from balspec.files import WRITE_ERRORS, apply_umask, failed_write
from balspec.training.loss import ExitLosses, next_token_labels

MODEL_PARTIAL = ".model.partial"  # where save_base writes before renaming the files into place


def trains_base(c) -> bool:
    """Does the run train the base model (a TrainingConfig)?"""
    return c.method == "sorted" or c.exits.train_base


def needs_original(c) -> bool:
    """Does the loss read the original full model (a frozen copy)? Every unfrozen-balcony run, and SoFT's KL."""
    return c.method == "balcony" or c.loss.sorted_target == "kl"


class BaseDistiller(nn.Module):
    """The module accelerate prepares when the base trains: the model and its exits (for SoFT, shared-head
    exits with no weights of their own). `original`: the frozen full model before training, or None (the
    metrics then compare with the current full model)."""

    def __init__(self, model: nn.Module, exits: Exits, ce_only: bool, ce_weight: float, chunk: int,
                 original: nn.Module | None = None):
        super().__init__()
        self.model, self.exits = model, exits
        self.ce_only, self.ce_weight, self.chunk = ce_only, ce_weight, chunk
        self._original = [original]  # in a list: no submodule, so neither trained, prepared nor saved

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> ExitLosses:
        """input_ids [batch, seq]; loss_mask [batch, seq] bool: the positions the loss counts (None: all).
        Returns per-exit numbers in the order of `exits.exits`, and in `full_loss` the full model's own term:
        the loss is ExitLosses.loss.sum() + full_loss. kl and agree compare with the original full model."""
        parts = model_parts(self.model)
        out = self.model(input_ids, output_hidden_states=True, logits_to_keep=1)
        # hidden_states[e]: the output of trunk layer e; hidden_states[N]: the final normed states
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        rope = parts.rotary(out.hidden_states[0], positions)
        normed = [self.exits[e](out.hidden_states[e], rope) for e in self.exits.exits] + [out.hidden_states[-1]]
        original = self._original[0]
        with torch.no_grad():
            if original is not None:
                reference = original(input_ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
                reference_head = model_parts(original).head
            else:
                reference, reference_head = out.hidden_states[-1].detach(), parts.head
        labels = next_token_labels(input_ids).flatten()  # [batch * seq]
        flat = [h.flatten(0, 1) for h in normed]  # [batch * seq, hidden] each
        reference = reference.flatten(0, 1)
        if loss_mask is not None:
            rows = loss_mask.flatten().nonzero().squeeze(1)  # [counted]
            flat, reference, labels = [h[rows] for h in flat], reference[rows], labels[rows]
        n, n_valid = max(len(labels), 1), max(int((labels >= 0).sum()), 1)
        sums = head_sums(flat, reference, labels, parts.head, reference_head, self.chunk)  # [exits + 1, 3]
        kl, ce, agree = sums[:, 0] / n, sums[:, 1] / n_valid, sums[:, 2].detach() / n
        loss = ce if self.ce_only else kl + self.ce_weight * ce
        return ExitLosses(loss[:-1], kl[:-1].detach(), ce[:-1].detach(), agree[:-1], len(labels), loss[-1])


def head_sums(hidden: list[torch.Tensor], reference: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
              reference_head: nn.Linear, chunk: int) -> torch.Tensor:
    """[len(hidden), 3]: per sub-model, sums over positions of KL(p || q) (nats), next-token CE of q (labels -100
    count nothing) and top-1 agreement, with q = softmax(head(h)) for each h in `hidden`, p =
    softmax(reference_head(reference)); each h and reference [positions, hidden_size], labels [positions].
    Differentiable in `hidden` and the head (KL and CE). p is made once per chunk for every sub-model."""
    ref_weight, ref_bias = reference_head.weight.detach(), getattr(reference_head, "bias", None)
    total = hidden[0].new_zeros(len(hidden), 3, dtype=torch.float32)
    for start in range(0, reference.shape[0], chunk):
        rows = slice(start, start + chunk)
        with torch.no_grad():
            log_p = F.linear(reference[rows].to(ref_weight.dtype), ref_weight, ref_bias).float().log_softmax(-1)
        args = [(h[rows], log_p, labels[rows], head.weight, head.bias) for h in hidden]
        if torch.is_grad_enabled():  # the [chunk, vocab] logits are made again in the backward pass, not kept
            sums = [checkpoint(_chunk_sums, *a, use_reentrant=False) for a in args]
        else:
            sums = [_chunk_sums(*a) for a in args]
        total = total + torch.stack(sums)
    return total


def _chunk_sums(hidden, log_p, labels, weight, bias) -> torch.Tensor:
    log_q = F.linear(hidden, weight, bias).float().log_softmax(-1)  # [chunk, vocab]
    kl = (log_p.exp() * (log_p - log_q)).sum()
    ce = F.nll_loss(log_q, labels, ignore_index=-100, reduction="sum")
    agree = (log_q.argmax(-1) == log_p.argmax(-1)).sum().float()
    return torch.stack([kl, ce, agree])


def frozen_copy(model: nn.Module) -> nn.Module:
    """The original full model, kept as it was before training (a loss's reference)."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def save_base(model: nn.Module, tokenizer, directory: Path) -> None:
    """Write the trained base as a Hugging Face model directory's files into `directory`, which may hold other
    files (a run directory, a checkpoint): into a hidden temp directory first, then each file renamed into place,
    config.json last, so that a loader never takes a half-written model."""
    partial = directory / MODEL_PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        apply_umask(partial)  # safetensors writes 0600
        for file in sorted(partial.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(file, directory / file.name)
    except WRITE_ERRORS as e:
        raise BalspecError(f"cannot write the trained model into {directory} ({failed_write(e)})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_base(model: nn.Module, directory: Path) -> None:
    """Copy the base weights saved in `directory` (a checkpoint of a run that trains the base) into `model`."""
    try:
        saved = type(model).from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
        model.load_state_dict(saved.state_dict())
    except Exception as e:  # transformers and safetensors raise their own types for a damaged directory
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BalspecError(f"--resume: the trained model in {directory} is damaged or does not fit this run "
                           f"({reason})") from None
