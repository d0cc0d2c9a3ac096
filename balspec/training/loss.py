"""Self-distillation loss (paper eq. 2): sum over exits of KL(p_full || q_exit), averaged over positions.

One no-grad forward of the frozen model gives the trunk hidden states at every exit and the final normed
hidden state, whose image under the LM head is the teacher's logits. Each balcony runs on its exit's
hidden states. The shared LM head and the KL are then fused and chunked over positions: per chunk the
teacher's and each exit's logits are made, the KL, top-1 agreement and the gradient w.r.t. the exit's
hidden state computed, and the logits dropped. So memory holds a few chunk x vocab buffers instead of
[batch, seq, vocab] logits per exit, the buffers are reused from step to step (a fresh 200 MB tensor
costs as much as a matmul on a CPU, in page faults), and the backward pass is a multiplication by a
stored [positions, hidden] gradient. The head matmuls are the bulk of the cost: two per exit per
position (logits, gradient), against one for the teacher. Softmaxes are fp32 whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from balspec.engine.architecture import Architecture
from balspec.errors import BalspecError
from balspec.exits import Exits


@dataclass
class ExitLosses:
    """Per-exit numbers of one batch, each [exits] in the order of `Exits.exits`."""

    loss: torch.Tensor  # kl + ce_weight * ce: the only differentiable one
    kl: torch.Tensor  # mean over positions of KL(p_full || q_exit), in nats
    ce: torch.Tensor  # mean next-token cross-entropy of the exit (0 when not computed)
    agree: torch.Tensor  # fraction of positions where the exit's argmax equals the full model's
    positions: int = 0  # positions the means are over
    full_loss: torch.Tensor | None = None  # a run that trains the base (sorted.py): the full model's own term


def teacher_forward(model: nn.Module, input_ids: torch.Tensor, exits: list[int]):
    """(final normed hidden state [batch, seq, hidden], [trunk hidden states [batch, seq, hidden] per exit]).

    The teacher's logits are head(final hidden state); `distill_losses` makes them chunk by chunk, so the
    forward keeps logits for the last position only.
    """
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, logits_to_keep=1)
    # hidden_states[0] is the embedding output, hidden_states[e] the output of trunk layer e (e < N) and
    # hidden_states[N] the output of the final norm.
    return out.hidden_states[-1], [out.hidden_states[e] for e in exits]


class _Stop(Exception):
    """Raised by a forward hook once the last trunk layer needed has run: the rest of the model is skipped."""


def trunk_forward(model: nn.Module, input_ids: torch.Tensor, exits: list[int]) -> list[torch.Tensor]:
    """The trunk hidden states [batch, seq, hidden] after layer e for each e in `exits`, equal to those
    `teacher_forward` returns (the model's own forward, the same kernels), running layers 1..max(exits) only:
    forward hooks record the layers' outputs and stop the forward after the last one needed. For a teacher
    cache's blocks (teacher_cache.py), whose teacher states are stored."""
    from balspec.exits import model_parts

    layers = model_parts(model).layers
    states: dict[int, torch.Tensor] = {}
    last = max(exits)

    def recorder(e: int):
        def hook(module, args, output):
            states[e] = output[0] if isinstance(output, tuple) else output
            if e == last:
                raise _Stop
        return hook

    def embedded(module, args, kwargs):  # exit 0 (a draft-kind exit): the first layer's input
        states[0] = args[0] if args else kwargs["hidden_states"]
        if last == 0:
            raise _Stop

    handles = [layers[e - 1].register_forward_hook(recorder(e)) for e in set(exits) if e > 0]
    if 0 in exits:
        handles.append(layers[0].register_forward_pre_hook(embedded, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [states[e] for e in exits]


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels for cross-entropy: the next token, -100 at the last position of each block. [batch, seq]"""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


class Workspace:
    """Logit-sized buffers kept between calls: allocating them afresh each step is slow on a CPU."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.device != device:
            self.buffers[name] = buf = torch.empty(shape, dtype=torch.float32, device=device)
        return buf


def teacher_stats(teacher_hidden: torch.Tensor, head: nn.Linear, arch: Architecture | None = None,
                  chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [positions] float32, argmax [positions] long) of the teacher's logits head(teacher_hidden) over the
    whole vocabulary, made as `distill_losses` makes them (fp32 buffers, the architecture's divisor and cap).
    Stored beside cached teacher states, they let a draft-vocabulary loss skip the teacher's full head."""
    divisor, softcap = (arch.logits_divisor, arch.logit_softcap) if arch is not None else (None, None)
    n = teacher_hidden.shape[0]
    lse, top = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.long)
    buffer = torch.empty((min(chunk, n), head.weight.shape[0]), dtype=torch.float32, device=teacher_hidden.device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            t = _finish(_logits_into(buffer[:rows.stop - rows.start], teacher_hidden[rows], head.weight,
                                     head.bias), divisor, softcap)
            max_t, top_t = t.max(dim=-1)
            lse[rows] = _logsumexp(max_t, torch.softmax(t, dim=-1, out=t), top_t).cpu()
            top[rows] = top_t.cpu()
    return lse, top


def distill_losses(hidden: list[torch.Tensor], teacher_hidden: torch.Tensor, head: nn.Linear,
                   labels: torch.Tensor | None = None, ce_weight: float = 0.0, chunk: int = 1024,
                   workspace: Workspace | None = None, vocab: torch.Tensor | None = None,
                   arch: Architecture | None = None,
                   stats: tuple[torch.Tensor, torch.Tensor] | None = None, top1_weight: float = 0.0) -> ExitLosses:
    """Losses of the exits whose normed balcony outputs are `hidden` (each [positions, hidden_size]).

    teacher_hidden: the full model's final normed hidden states [positions, hidden_size]; labels:
    [positions] (-100: none), needed when ce_weight > 0. Gradients flow to `hidden` only: the head is
    the base model's and stays frozen.

    vocab: [V] distinct token ids of a reduced draft vocabulary (loss.draft_vocab), or None for the whole
    one. With it, an exit's distribution is q = softmax over V of its logits there (what its reduced draft
    head proposes), and a position's loss is p(V) KL(p_V / p(V) || q): the KL from the teacher's
    distribution restricted to V and renormalised, weighted by the teacher's mass in V (a position whose
    next token is rarely in V can hardly be drafted). Its gradient w.r.t. z_V is p(V) q - p_V. Agreement
    counts positions where the exit's choice within V is the teacher's token over the whole vocabulary. The
    teacher's softmax still spans the whole vocabulary; each exit's head products shrink to |V| rows. No CE.

    arch: the base model's logit divisor (Granite) and soft-cap (Gemma) apply to the head's products,
    teacher's and exits' alike, so that p and q are the model's own distributions.

    stats: the teacher's (lse, argmax) per position over the whole vocabulary (`teacher_stats`, from a teacher
    cache): with `vocab`, the teacher's logits are then made over V only, p_V = exp(t_V - lse), the same loss
    up to rounding for |V| / vocabulary of the teacher's head cost. Ignored without `vocab`.

    top1_weight: adds top1_weight x the cross-entropy to the teacher's top-1 token (over the whole vocabulary),
    the token greedy verification accepts, averaged over all positions; with `vocab` it is taken over V, and a
    position whose top-1 lies outside V adds nothing (no draft from V could be accepted there). It stands in the
    `ce` metric, in place of the data's CE (the two are exclusive). A mix of divergences for greedy drafting, as
    DistillSpec (Zhou et al. 2023, arXiv 2310.08461) compares them.
    """
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if vocab is not None and ce_weight > 0:
        raise ValueError("a draft-vocabulary KL takes no cross-entropy to the data's tokens")
    if ce_weight > 0 and top1_weight > 0:
        raise ValueError("ce_weight and top1_weight are exclusive")
    want_grad = torch.is_grad_enabled() and any(h.requires_grad for h in hidden)
    n = teacher_hidden.shape[0]
    if n == 0:  # a batch without a counted position: zero loss, still a graph for backward (and DDP) to walk
        zero = torch.stack([h.sum() * 0 for h in hidden]).float()
        return ExitLosses(zero, zero.detach(), zero.detach(), zero.detach(), 0)
    divisor, softcap = (arch.logits_divisor, arch.logit_softcap) if arch is not None else (None, None)
    loss, metrics = _FusedHeadKL.apply(teacher_hidden, labels, head.weight, head.bias, ce_weight, chunk,
                                       want_grad, workspace or Workspace(), vocab, divisor, softcap,
                                       stats if vocab is not None else None, top1_weight, *hidden)
    return ExitLosses(loss, metrics[0], metrics[1], metrics[2], n)


class _FusedHeadKL(torch.autograd.Function):
    """LM head + KL (+ CE) per chunk of positions; the gradient w.r.t. the exit hidden states is made here.

    With z the exit logits, t the teacher's, p = softmax(t), q = softmax(z), per position:
      KL(p || q) = sum_v p_v log p_v - sum_v p_v z_v + lse(z)      d KL / dz = q - p
      CE = lse(z) - z_label                                       d CE / dz = q - onehot(label)
    and lse(z) = max(z) - log(q_argmax), so no pass over the vocabulary is spent on it. With a divisor d and a
    soft-cap c the logits are z = c tanh(x / (d c)) of the head's product x, and dz/dx = (1 - (z/c)^2) / d.
    """

    @staticmethod
    def forward(ctx, teacher_hidden, labels, weight, bias, ce_weight, chunk, want_grad, workspace, vocab, divisor,
                softcap, stats, top1_weight, *hidden):
        n, device = teacher_hidden.shape[0], teacher_hidden.device
        n_valid = max(int((labels >= 0).sum()), 1) if labels is not None else 1
        column = None  # with top1_weight over a draft vocabulary: token id -> its column of z (-100: outside V)
        if top1_weight > 0:  # the CE's target is the teacher's top-1; averaged over all positions
            ce_weight, n_valid = top1_weight, n
            if vocab is not None:
                column = torch.full((weight.shape[0],), -100, dtype=torch.long, device=device)
                column[vocab] = torch.arange(len(vocab), device=device)
        sums = torch.zeros(3, len(hidden), dtype=torch.float64, device=device)  # kl, ce, agree
        grads = [torch.empty_like(h) for h in hidden] if want_grad else None
        shape = (min(chunk, n), weight.shape[0])
        # The exits' head: the whole one, or its rows of the draft vocabulary.
        weight_s = weight if vocab is None else weight.index_select(0, vocab)
        bias_s = bias if bias is None or vocab is None else bias.index_select(0, vocab)
        shape_s = (shape[0], weight_s.shape[0])
        if stats is None:
            logits, p = (workspace.get(name, shape, device) for name in ("logits", "p"))  # [chunk, vocab]
        else:  # the teacher's logits and probabilities over the draft vocabulary only
            logits, p = (workspace.get(name, shape_s, device) for name in ("logits_v", "p_v"))  # [chunk, |vocab|]
        q = workspace.get("q", shape_s, device)  # [chunk, |vocab|]
        z_buf = logits if vocab is None else workspace.get("z", shape_s, device)  # the teacher's buffer once dead
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            size = rows.stop - rows.start
            lab = labels[rows] if labels is not None and top1_weight == 0 else None
            if stats is not None:  # p_V = exp(t_V - lse): the teacher's lse and argmax come with its states
                t = _finish(_logits_into(logits[:size], teacher_hidden[rows], weight_s, bias_s), divisor, softcap)
                lse_t, top_t = stats[0][rows], stats[1][rows]
                p_t = torch.sub(t, lse_t.unsqueeze(1), out=p[:size]).exp_()  # [chunk, |vocab|]
                mass = p_t.sum(dim=-1)  # [chunk]: p(V)
                p_logp = _rowdot(p_t, t) - mass * lse_t - mass * mass.clamp(min=1e-30).log()
            else:
                t = _finish(_logits_into(logits[:size], teacher_hidden[rows], weight, bias), divisor, softcap)
                max_t, top_t = t.max(dim=-1)  # [chunk]
                p_t = torch.softmax(t, dim=-1, out=p[:size])
                lse_t = _logsumexp(max_t, p_t, top_t)
                if vocab is None:
                    mass = None
                    p_logp = _rowdot(p_t, t) - lse_t  # [chunk]: sum_v p_v log p_v
                else:  # p(V) KL(p_V / p(V) || q) = sum_V p_v log p_v - p(V) log p(V) - sum_V p_v z_v + p(V) lse(z)
                    p_t = p_t.index_select(1, vocab)  # [chunk, |vocab|]
                    mass = p_t.sum(dim=-1)  # [chunk]: p(V)
                    p_logp = _rowdot(p_t, t.index_select(1, vocab)) - mass * lse_t - mass * mass.clamp(min=1e-30).log()
            if top1_weight > 0:
                lab = top_t if column is None else column[top_t]  # [chunk]: -100 where the top-1 is outside V
            for i, h in enumerate(hidden):
                z = _finish(_logits_into(z_buf[:size], h[rows], weight_s, bias_s), divisor, softcap)
                max_z, top_z = z.max(dim=-1)
                p_z = _rowdot(p_t, z)
                q_z = torch.softmax(z, dim=-1, out=q[:size])  # z stays: its buffer is not q's
                lse_z = _logsumexp(max_z, q_z, top_z)
                sums[0, i] += (p_logp - p_z + (lse_z if mass is None else mass * lse_z)).sum()
                sums[2, i] += ((top_z if vocab is None else vocab[top_z]) == top_t).sum()
                if lab is not None:
                    z_label = z.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
                    sums[1, i] += ((lse_z - z_label) * (lab >= 0)).sum()
                if want_grad:
                    scale = _logit_gradient(q_z, p_t, n, ce_weight, n_valid, lab, mass)
                    if softcap is not None:  # z is no longer needed: its buffer takes dz/dx
                        q_z.mul_(z.div_(softcap).square_().neg_().add_(1))
                    if divisor is not None:
                        scale = scale / divisor
                    grads[i][rows] = (_matmul(q_z, weight_s) * scale).to(h.dtype)  # [chunk, hidden]
        kl, ce, agree = sums[0] / n, sums[1] / n_valid, sums[2] / n
        ctx.grads = grads
        metrics = torch.stack([kl, ce, agree]).float()  # [3, exits]
        ctx.mark_non_differentiable(metrics)
        return (kl + ce_weight * ce).float(), metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        grads = [g * grad_loss[i].to(g.dtype) for i, g in enumerate(ctx.grads)]
        ctx.grads = None
        return (None,) * 13 + tuple(grads)


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """head(h) written into the fp32 buffer `out` [rows, vocab]."""
    if weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        torch.mm(h.float(), weight.t(), out=out)
        return out if bias is None else out.add_(bias)
    return out.copy_(F.linear(h.to(weight.dtype), weight, bias))


def _finish(logits: torch.Tensor, divisor: float | None, softcap: float | None) -> torch.Tensor:
    """Architecture.finish_logits in place on a [rows, vocab] buffer."""
    if divisor is not None:
        logits.div_(divisor)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _matmul(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a @ weight, [rows, vocab] x [vocab, hidden], in the weight's dtype (or autocast's)."""
    return a.to(weight.dtype) @ weight


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products [rows] of two [rows, vocab] tensors, without a [rows, vocab] temporary.
    In fp32 even under autocast: the KL is a difference of such sums, tens of nats each."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _logsumexp(row_max: torch.Tensor, softmax: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """lse(x) = max(x) - log(softmax(x)[argmax x]); that softmax entry is at least 1/vocab: no underflow."""
    return row_max - softmax.gather(1, argmax.unsqueeze(1)).squeeze(1).log()


def _logit_gradient(q: torch.Tensor, p: torch.Tensor, n: int, ce_weight: float, n_valid: int,
                    labels: torch.Tensor | None, mass: torch.Tensor | None = None) -> float:
    """Turn q into d loss / d z, in place, up to a factor that is returned: it is applied after the head
    matmul, to the [chunk, hidden] product instead of the [chunk, vocab] tensor.
    d loss / d z = (m q - p) / n + ce_weight * (q - onehot(label)) / n_valid, with m = p(V) [chunk] over a
    draft vocabulary (`mass`), else 1."""
    if labels is None or ce_weight == 0:
        if mass is not None:
            q.mul_(mass.unsqueeze(-1))  # d/dz = p(V) q - p_V
        q.sub_(p)
        return 1.0 / n
    ok = labels >= 0
    kl_scale = torch.full_like(q[:, 0], 1.0 / n) if mass is None else mass / n
    scale = kl_scale + ok * (ce_weight / n_valid)  # [chunk]
    q.mul_(scale.unsqueeze(-1)).sub_(p, alpha=1.0 / n)
    rows = torch.nonzero(ok).squeeze(1)
    q[rows, labels[rows]] -= ce_weight / n_valid
    return 1.0


class Distiller(nn.Module):
    """The module accelerate prepares: the balconies (its only parameters) and their loss.

    The frozen base model stays outside it, so DDP/FSDP/DeepSpeed wrap and shard only the balconies.
    """

    def __init__(self, exits: Exits, ce_weight: float = 0.0, chunk: int = 1024, checkpointing: bool = False,
                 draft_chain: int = 1, draft_vocab: torch.Tensor | None = None, top1_weight: float = 0.0):
        super().__init__()
        self.exits = exits
        self.ce_weight, self.chunk, self.checkpointing = ce_weight, chunk, checkpointing
        self.top1_weight = top1_weight  # CE to the teacher's top-1 (distill_losses)
        self.draft_chain = draft_chain  # draft-kind exits: r ~ uniform 0..draft_chain-1 unverified rows
        if draft_chain > 1 and exits.balcony_layers > 1 and "draft" in exits.kinds.values():
            raise BalspecError("exits.draft_chain: draft exits with more than one balcony layer train as a cycle's "
                               "first draft only; set exits.draft_chain to 1")
        # [V] token ids: the KL over a reduced draft vocabulary (loss.draft_vocab); moves with the module
        self.register_buffer("draft_vocab", draft_vocab, persistent=False)
        self.workspace = Workspace()

    def forward(self, trunk: list[torch.Tensor], position_embeddings, teacher_hidden: torch.Tensor, head: nn.Linear,
                labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                first_drafts: bool = False, draws: torch.Generator | None = None,
                stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> ExitLosses:
        """trunk: hidden states [batch, seq, hidden] at each exit; position_embeddings: cos, sin [batch, seq,
        rotary dim] of the base's last layer's kind (Balcony.forward); teacher_hidden: the final normed ones;
        loss_mask [batch, seq] bool: the positions the loss counts (None: all). The balconies run on every
        position (each needs its context); the head and the KL only on the counted ones.

        Draft-kind exits also read teacher_hidden (the verified context) and, per position, how many drafted
        positions precede it unverified: r drawn uniformly from 0..draft_chain-1 with the CPU generator `draws`
        (training seeds one per step, so a resumed run draws the same; None: torch's global one), as a chain of
        up to draft_chain drafts meets them; first_drafts: r = 0 everywhere (evaluation: every position scored
        as the first draft of a cycle, deterministically). stats: the teacher's (lse, argmax) [batch, seq] from a
        teacher cache (distill_losses)."""
        normed, unverified = [], None
        for e, h in zip(self.exits.exits, trunk):
            balcony = self.exits[e]
            h = h.to(balcony.norm.weight.dtype)
            extra = ()
            if balcony.kind == "draft":
                if unverified is None and first_drafts:
                    unverified = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)  # [batch, seq]
                elif unverified is None:
                    unverified = torch.randint(0, self.draft_chain, h.shape[:2], generator=draws).to(h.device)
                extra = (teacher_hidden.to(h.dtype), unverified)
            if self.checkpointing and torch.is_grad_enabled():
                out = checkpoint(balcony, h, position_embeddings, *extra, use_reentrant=False)
            else:
                out = balcony(h, position_embeddings, *extra)
            normed.append(out.flatten(0, 1))  # [batch * seq, hidden]
        flat_labels = labels.flatten() if labels is not None and self.ce_weight > 0 else None
        teacher = teacher_hidden.flatten(0, 1)  # [batch * seq, hidden]
        flat_stats = None if stats is None else [s.flatten() for s in stats]  # [batch * seq] each
        if loss_mask is not None:
            rows = loss_mask.flatten().nonzero().squeeze(1)  # [counted]
            normed = [h.index_select(0, rows) for h in normed]
            teacher = teacher.index_select(0, rows)
            flat_labels = flat_labels.index_select(0, rows) if flat_labels is not None else None
            flat_stats = None if flat_stats is None else [s.index_select(0, rows) for s in flat_stats]
        return distill_losses(normed, teacher, head, flat_labels, self.ce_weight, self.chunk, self.workspace,
                              self.draft_vocab, self.exits.arch, flat_stats, self.top1_weight)
