"""SeqPE's two regularizers, L_δ (Eq. 9) and L_OOD (Eq. 10), for any position space.

Legend: ``*b`` batch dims, ``b`` pivots, ``c`` candidates per pivot, ``r`` shifted regions,
``m`` teachers per region, ``h`` heads, ``e`` head dim, ``d`` model dim, ``w`` position width.

The losses are plain functions of embeddings, so tests can hold them against loops written
from the paper; :class:`SeqPERegularizer` samples positions from the space and runs the encoder
once per training step over main-task and regularizer positions together.
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from seqpe_nd.encoder import SeqPE, Space
from seqpe_nd.positions.samplers import ContrastiveBatch, OODBatch


def contrastive_loss(
    pivot: Float[Tensor, "b d"],
    candidates: Float[Tensor, "b c d"],
    target: Int[Tensor, " b"],
    valid: Bool[Tensor, "b c"],
) -> Float[Tensor, ""]:
    """Eq. 9: -log softmax over raw dot products e_p · e_p', at p⁺; invalid candidates leave the softmax."""
    _check_targets(target, valid)
    return _contrastive_loss(pivot, candidates, target, valid)


def _check_targets(target: Tensor, valid: Tensor) -> None:
    """Every p⁺ must be a valid candidate (one host read: do it where the tensors live on the host). Skipped
    under ``torch.compile``, where the read would break the graph."""
    if torch.compiler.is_compiling():
        return
    if not bool(valid.gather(1, target[:, None]).all()):
        raise ValueError("every target p⁺ must be a valid candidate (valid[i, target[i]] must be True)")


def _contrastive_loss(pivot: Tensor, candidates: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    logits = torch.einsum("bd,bcd->bc", pivot.float(), candidates.float())  # no temperature, no normalisation
    logits = logits.masked_fill(~valid, float("-inf"))
    return F.cross_entropy(logits, target)


OODReduction = Literal["mean", "batchmean"]
OOD_REDUCTIONS: tuple[str, ...] = get_args(OODReduction)


def ood_loss(
    teacher: Float[Tensor, "r m d"],
    student: Float[Tensor, "r m d"],
    heads: int,
    *,
    symmetric: bool = True,
    reduction: OODReduction = "mean",
) -> Float[Tensor, ""]:
    """Eq. 10, multi-head (App. A.3): KL(SG(P) || S) per head, averaged over heads and regions.

    ``P``/``S`` are row-softmaxed dot-product similarity matrices of the teacher (in D_train) and
    student (shifted) embeddings. Each row's KL is summed over its m columns and averaged over
    rows; ``reduction="mean"`` (default) then divides by m as well, the scale of the released
    code's ``F.kl_div(..., reduction="mean")`` at which the paper's β = 0.1 was tuned;
    ``"batchmean"`` keeps the per-row sum (m times larger: use β/m for the same weight).
    ``symmetric`` (default, as the released criterion) adds KL(S || SG(P)); False is Eq. 10 as printed.
    The teacher never receives a gradient.
    """
    d = teacher.shape[-1]
    if heads < 1 or d % heads:
        raise ValueError(f"heads = {heads} must be a positive divisor of the embedding width d = {d}")
    if reduction not in OOD_REDUCTIONS:
        raise ValueError(f"reduction = {reduction!r} is not allowed; choose one of {', '.join(OOD_REDUCTIONS)}")
    r, m, _ = teacher.shape

    def similarity(x: Tensor) -> Tensor:
        x = x.float().view(r, m, heads, d // heads).transpose(1, 2)  # (r, h, m, e)
        return torch.log_softmax(x @ x.transpose(-1, -2), dim=-1)  # (r, h, m, m), log rows of P or S

    log_p = similarity(teacher.detach())  # SG(P)
    log_s = similarity(student)
    kl = (log_p.exp() * (log_p - log_s)).sum(-1)  # (r, h, m): KL(SG(P) || S) per row
    if symmetric:
        kl = kl + (log_s.exp() * (log_s - log_p)).sum(-1)  # + KL(S || SG(P))
    loss = kl.mean()  # rows, heads, regions
    return loss / m if reduction == "mean" else loss


@dataclass(frozen=True)
class ContrastiveProbe:
    """How well an encoder solves L_δ on fresh candidate sets (a diagnostic, no gradient)."""

    loss: float
    """Mean L_δ (Eq. 9)."""
    chance: float
    """L_δ of an encoder that cannot tell candidates apart: mean log of the valid candidates per pivot."""
    top1: float
    """Share of pivots whose p⁺ gets the highest score."""


@torch.no_grad()
def probe_contrastive(
    encoder: SeqPE, generator: torch.Generator, *, batches: int = 4, batch: int = 64
) -> ContrastiveProbe:
    """L_δ, its chance level and p⁺'s top-1 rate on ``batches`` fresh sets of ``batch`` pivots of the space."""
    losses, chances, top1 = [], [], []
    for _ in range(batches):
        con = encoder.space.sample_contrastive(generator, batch=batch)
        dev = encoder.place_ids.device
        target, valid = con.target.to(dev), con.valid.to(dev)
        pivot, cand = encoder.encode(con.pivots, con.candidates)
        losses.append(contrastive_loss(pivot, cand, target, valid))
        chances.append(valid.sum(-1).float().log().mean())
        logits = torch.einsum("bd,bcd->bc", pivot.float(), cand.float()).masked_fill(~valid, float("-inf"))
        top1.append((logits.argmax(-1) == target).float().mean())
    return ContrastiveProbe(loss=_mean(losses), chance=_mean(chances), top1=_mean(top1))


def _mean(values: list[Tensor]) -> float:
    return float(torch.stack(values).mean())


def train_regularizers_alone(
    encoder: SeqPE,
    regularizer: "SeqPERegularizer",
    steps: int,
    *,
    lr: float,
    generator: torch.Generator,
    main_pos: Int[Tensor, "*b w"] | None = None,
    decay: bool = False,
) -> list[Tensor]:
    """Adam on α·L_δ + β·L_OOD alone (no task) for ``steps`` steps; returns each step's L_δ (detached).

    ``main_pos`` stands in for the task's positions (default none); ``decay`` lowers the rate
    linearly to 0, so the run ends on a settled encoder. A step with nothing to differentiate
    (α = β = 0) is skipped. A diagnostic and a warm start: the encoder learns the space alone.
    """
    opt = torch.optim.Adam(encoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / max(steps, 1)) if decay else None
    main = torch.zeros(0, encoder.space.width, dtype=torch.int64) if main_pos is None else main_pos
    encoder.train()
    losses = []
    for _ in range(steps):
        out = regularizer.step(encoder, main, generator, shifted=False)
        if out.loss.requires_grad:
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        losses.append(out.parts["loss_delta"])
    return losses


class RegularizerDraws(NamedTuple):
    """One training step's random positions for L_δ and L_OOD (None where a loss is off or skipped): they depend
    on no model value, so :meth:`SeqPERegularizer.draw` makes them on the host ahead of the forward, and no
    ``torch.Generator`` needs to enter a compiled forward."""

    contrastive: ContrastiveBatch | None
    """Pivots, candidates, ``p⁺`` and the valid mask for L_δ (Eq. 9)."""
    ood: OODBatch | None
    """Teacher and student positions for L_OOD (Eq. 10)."""


@dataclass(frozen=True)
class RegularizedStep:
    """What one training step gets back: main-task embeddings, α·L_δ + β·L_OOD, and its parts."""

    embeddings: Tensor
    """Embeddings of the main-task positions, shape ``(*main_pos.shape[:-1], d)``."""
    loss: Tensor
    """Scalar α·L_δ + β·L_OOD (zero when both are off)."""
    parts: dict[str, Tensor]
    """``loss_delta``, ``loss_ood`` (unweighted; 0 when skipped) and ``loss_reg`` for logging: detached
    0-dim tensors, so logging costs no device sync until the trainer reads them."""


class SeqPERegularizer:
    """Samples L_δ and L_OOD positions from a space and scores them in one encoder call.

    Args:
        alpha: weight of L_δ (Eq. 15); 0 skips its sampling and compute.
        beta: weight of L_OOD (Eq. 15); 0 skips its sampling and compute.
        ood_heads: heads the embeddings are split into for L_OOD (App. A.3).
        symmetric_kl: KL(T‖S) + KL(S‖T) as the released code does (default); False: Eq. 10's KL(SG(P)‖S).
        ood_reduction: ``mean`` (the released code's scale, so β means the paper's β) or
            ``batchmean`` (per-row KL sum, m = teachers per region times larger); see :func:`ood_loss`.
    """

    def __init__(
        self,
        space: Space,
        *,
        alpha: float = 0.1,
        beta: float = 0.1,
        ood_heads: int,
        symmetric_kl: bool = True,
        ood_reduction: OODReduction = "mean",
    ) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if value < 0:
                raise ValueError(f"{name} = {value} is not allowed; loss weights must be >= 0")
        if ood_heads < 1:
            raise ValueError(f"ood_heads = {ood_heads} is not allowed; it must be a positive integer")
        if ood_reduction not in OOD_REDUCTIONS:
            allowed = ", ".join(OOD_REDUCTIONS)
            raise ValueError(f"ood_reduction = {ood_reduction!r} is not allowed; choose one of {allowed}")
        self.space, self.alpha, self.beta = space, alpha, beta
        self.ood_heads, self.symmetric_kl, self.ood_reduction = ood_heads, symmetric_kl, ood_reduction

    def draw(self, generator: torch.Generator, *, shifted: bool) -> RegularizerDraws:
        """The step's L_δ and L_OOD positions from ``generator``, in that order (L_OOD none on shifted steps)."""
        con = self.space.sample_contrastive(generator) if self.alpha > 0 else None
        ood = self.space.sample_ood(generator) if self.beta > 0 and not shifted else None
        return RegularizerDraws(con, ood)

    def step(
        self,
        encoder: SeqPE,
        main_pos: Tensor,
        generator: torch.Generator | None = None,
        *,
        shifted: bool,
        draws: RegularizerDraws | None = None,
    ) -> RegularizedStep:
        """Main-task embeddings and α·L_δ + β·L_OOD for one step; L_OOD is skipped on shifted steps.

        The regularizers' positions are ``draws`` (from :meth:`draw`) or, without them, drawn here from
        ``generator``; the same generator state gives the same positions either way."""
        # model_dump: the spaces' cached tensors make pydantic's == raise.
        if encoder.space is not self.space and encoder.space.model_dump() != self.space.model_dump():
            raise ValueError("the encoder was built for a different position space than this regularizer")
        if self.beta > 0 and encoder.d_model % self.ood_heads:
            raise ValueError(f"ood_heads = {self.ood_heads} must divide the encoder's d_model = {encoder.d_model}")
        if draws is None:
            if generator is None:
                raise ValueError("SeqPERegularizer.step needs a generator or the draws of SeqPERegularizer.draw")
            draws = self.draw(generator, shifted=shifted)
        con, ood = draws
        sets: list[Tensor] = [main_pos]
        if con is not None:
            sets += [con.pivots, con.candidates]
        if ood is not None:
            sets += [ood.teacher, ood.student]
        dev = encoder.place_ids.device
        # Sampled on the host (a CPU generator): copied without waiting, so a GPU step never syncs for them.
        out = encoder.encode(*(s.to(dev, non_blocking=True) for s in sets))  # one batched encoder call
        embeddings, rest = out[0], out[1:]

        loss = embeddings.new_zeros((), dtype=torch.float32)
        zero = loss.detach()
        parts = {"loss_delta": zero, "loss_ood": zero}
        if con is not None:
            e_pivot, e_cand, rest = rest[0], rest[1], rest[2:]
            _check_targets(con.target, con.valid)  # eager only; where the sampler left them: the host, no sync
            target, valid = con.target.to(dev, non_blocking=True), con.valid.to(dev, non_blocking=True)
            l_delta = _contrastive_loss(e_pivot, e_cand, target, valid)
            loss = loss + self.alpha * l_delta
            parts["loss_delta"] = l_delta.detach()
        if ood is not None:
            l_ood = ood_loss(
                rest[0], rest[1], self.ood_heads, symmetric=self.symmetric_kl, reduction=self.ood_reduction
            )
            loss = loss + self.beta * l_ood
            parts["loss_ood"] = l_ood.detach()
        parts["loss_reg"] = loss.detach()
        return RegularizedStep(embeddings=embeddings, loss=loss, parts=parts)
