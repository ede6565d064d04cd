"""SeqPE inside attention: the four integrations of §3.5 behind the PositionEncoding hooks.

Legend: ``b`` batch, ``n``/``m`` query/key tokens, ``w`` position width, ``h`` heads, ``e`` head
dim, ``d`` model dim.

``prepare`` encodes the forward's positions once (with the regularizers' positions in the same
encoder call when training), then per layer ``E^q, E^k = E W_PE^{q,k}`` (Eq. 11), split across
heads, enters attention as a q/k transform, so every integration runs in fused SDPA:

* attn_sum  (Eq. 12): ``(q + e^q)·(k + e^k)``
* attn_mul  (Eq. 13): ``(q ⊙ e^q)·(k ⊙ e^k)``
* attn_bias (Eq. 14): ``q·k + e^q·e^k = [q, e^q]·[k, e^k]``: concatenated along the head dim and
  scaled by the ORIGINAL ``1/√e``, so no ``[n, m]`` bias is ever built
* input_add: ``x_i + e_i`` on the input embeddings (Eq. 4 with SeqPE's ``e``)
"""

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from seqpe_nd.encoder import SeqPE
from seqpe_nd.encodings.base import KVCache, PEState, PositionEncoding, sdpa, visibility_mask
from seqpe_nd.encodings.method import MethodConfig, Sizes
from seqpe_nd.positions import GridSpace, HybridSpace
from seqpe_nd.regularizers import OODReduction, RegularizerDraws, SeqPERegularizer

Integration = Literal["attn_sum", "attn_mul", "attn_bias", "input_add"]
INTEGRATIONS: tuple[str, ...] = get_args(Integration)


def integrate(x: Float[Tensor, "b h n e"], pe: Float[Tensor, "b h n e"], integration: str) -> Float[Tensor, "b h n ex"]:
    """One side (q or k) of Eq. 12-14 as a transform whose dot products give the paper's scores."""
    pe = pe.to(x.dtype)
    if integration == "attn_sum":
        return x + pe
    if integration == "attn_mul":
        return x * pe
    if integration == "attn_bias":
        return torch.cat([x, pe], dim=-1)  # (b, h, n, 2e)
    raise ValueError(f"unknown SeqPE integration {integration!r}; valid: {', '.join(INTEGRATIONS)}")


COS_ROWS = 64  # distinct positions pe_cos and pe_spread look at

COLLAPSED_SPREAD = 0.05
"""``pe_spread`` below this (attention-logit units) reads as a collapsed position channel. A logit offset
of δ scales a key's attention weight by e^δ ≈ 1 + δ, so a spread of 0.05 moves weights by ~5 %: position
barely steers attention. Early training sits below it too: the LM smoke run (configs/lm/smoke/seqpe.yaml)
read 0.001-0.03 over steps 50-400 and 0.1-0.19 over steps 640-700 (a fresh encoder reads ~1e-3)."""


def distinct_rows(pos: Int[Tensor, "b n w"]) -> Int[Tensor, " k"]:
    """Flat row indices of up to COS_ROWS distinct positions of ``pos``, evenly spaced in position order."""
    flat = pos.reshape(-1, pos.shape[-1])
    uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)
    first = torch.empty(len(uniq), dtype=torch.long, device=flat.device).scatter_(
        0, inverse, torch.arange(len(flat), device=flat.device)
    )  # one row of ``flat`` per distinct position
    return first[torch.linspace(0, len(uniq) - 1, min(COS_ROWS, len(uniq)), device=flat.device).round().long()]


def spaced_rows(pos: Int[Tensor, "b n w"]) -> tuple[Int[Tensor, " k"], Bool[Tensor, " k"]]:
    """:func:`distinct_rows` in static shapes (for ``torch.compile``): flat row indices of ``k = min(COS_ROWS,
    rows)`` rows of ``pos``, evenly spaced over all its rows in position order, and which of them hold a
    position that the previous pick does not (the distinct ones). When every row of ``pos`` holds its own
    position the kept rows are :func:`distinct_rows`' positions."""
    flat = pos.reshape(-1, pos.shape[-1])
    order = torch.arange(len(flat), device=flat.device)
    for c in reversed(range(flat.shape[-1])):  # stable sorts, last coordinate first: lexicographic order
        order = order[flat[order, c].sort(stable=True).indices]
    picks = order[torch.linspace(0, len(flat) - 1, min(COS_ROWS, len(flat)), device=flat.device).round().long()]
    chosen = flat[picks]
    new = torch.ones(len(picks), dtype=torch.bool, device=flat.device)
    return picks, torch.cat([new[:1], (chosen[1:] != chosen[:-1]).any(-1)])


def _weights(x: Tensor, keep: Bool[Tensor, " k"] | None) -> Float[Tensor, " k"]:
    """Each row's weight in a mean over the rows a statistic counts (``keep``, default every row of ``x``)."""
    keep = torch.ones(x.shape[-2], dtype=torch.bool, device=x.device) if keep is None else keep
    return keep.float() / keep.sum().clamp(min=1)


def _mean_cosine(x: Float[Tensor, "k d"], keep: Bool[Tensor, " k"] | None = None) -> Float[Tensor, ""]:
    """Mean cosine over the pairs of distinct rows (those ``keep`` marks, default all); 1.0 for fewer than two."""
    kept = _weights(x, keep) > 0
    x = F.normalize(x.float(), dim=-1) * kept[:, None]
    k = kept.sum()
    cos = x @ x.T
    return torch.where(k >= 2, (cos.sum() - cos.diagonal().sum()) / (k * (k - 1)).clamp(min=1), 1.0)


@torch.no_grad()
def mean_pairwise_cosine(pos: Int[Tensor, "b n w"], emb: Float[Tensor, "b n d"]) -> Float[Tensor, ""]:
    """``pe_cos``: mean cosine between the embeddings of distinct positions (≤ COS_ROWS, evenly spaced).

    Not a collapse test: a collapsed encoder reads 1.0, but so does a healthy one whose embeddings share a large
    mean (the LM smoke run reads 0.999 from step ~60 on, while its ``pe_spread`` grows 100×); ``pe_spread`` is
    the test. No sync: a 0-dim tensor on the embeddings' device.
    """
    rows = distinct_rows(pos)
    return _mean_cosine(emb.detach().reshape(-1, emb.shape[-1])[rows.to(emb.device)])


@torch.no_grad()
def position_score_spread(
    e_q: Float[Tensor, "h k e"], e_k: Float[Tensor, "h k e"], keep: Bool[Tensor, " k"] | None = None
) -> Float[Tensor, ""]:
    """``pe_spread`` of the attention integrations: with ``s_ij = E^q_i · E^k_j / √e`` (Eq. 14's position
    term) per head, the std over keys ``j`` (population), averaged over heads and queries ``i``.

    In attention-logit units; 0 means no query's position scores depend on the key, so attention cannot see
    position. The keys are centred before the product (``s_ij - mean_j s_ij = E^q_i · (E^k_j - mean E^k)``),
    so a large shared mean costs no precision. ``keep`` (default all) marks the positions that count."""
    e_q, e_k = e_q.float(), e_k.float()
    w = _weights(e_k, keep)  # (k,): the mean over the kept positions
    centred = e_k - (e_k * w[:, None]).sum(dim=-2, keepdim=True)
    dev = e_q @ centred.transpose(-1, -2) / math.sqrt(e_q.shape[-1])  # (h, k, k)
    return ((dev.pow(2) * w).sum(dim=-1).sqrt() * w).sum(dim=-1).mean()


@torch.no_grad()
def embedding_spread(emb: Float[Tensor, "k d"], keep: Bool[Tensor, " k"] | None = None) -> Float[Tensor, ""]:
    """``pe_spread`` of input_add: the RMS over positions of ``‖e_i - mean_i e_i‖``, the size of the
    position-dependent part of what is added to the token embeddings (in the embeddings' units); 0 when every
    position gets the same vector. ``keep`` (default all) marks the positions that count."""
    x, w = emb.float(), _weights(emb, keep)
    return ((x - (x * w[:, None]).sum(dim=0)).pow(2).sum(dim=-1) * w).sum().sqrt()


class SeqPEEncoding(PositionEncoding):
    """SeqPE (owning its encoder and optional regularizer, so both train with the model)."""

    method = "seqpe"

    def __init__(
        self,
        *,
        encoder: SeqPE,
        regularizer: SeqPERegularizer | None,
        integration: Integration,
        per_layer: bool,
        num_heads: int,
        head_dim: int,
        num_layers: int,
        w_pe_bias: bool = True,
        w_pe_std: float = 0.02,
        encoder_lr_scale: float = 1.0,
        encoder_lr_max: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=encoder.space.width)
        self.encoder_lr_scale, self.encoder_lr_max = encoder_lr_scale, encoder_lr_max
        if integration not in INTEGRATIONS:
            raise ValueError(f"unknown SeqPE integration {integration!r}; valid: {', '.join(INTEGRATIONS)}")
        self.encoder, self.regularizer = encoder, regularizer
        self.integration, self.per_layer = integration, per_layer
        if integration != "input_add":
            depth = num_layers if per_layer else 1
            # Eq. 11: W_PE^{q,k} ∈ R^{d × 2·h·e}; rows [:h·e] give E^q, rows [h·e:] give E^k. As released
            # (text: nn.Linear(bias=True) under GPT-2's init; images: bias=qkv_bias under timm's): a bias, and
            # the encoder's N(0, 0.02) init (w_pe_std) with a zero bias, not PyTorch's kaiming-uniform (std 0.05 at d = 128).
            self.w_pe = nn.ModuleList(
                nn.Linear(encoder.d_model, 2 * num_heads * head_dim, bias=w_pe_bias) for _ in range(depth)
            )
            for lin in self.w_pe:
                encoder._init_weights(lin, std=w_pe_std)

    def lr_scales(self, lr: float) -> list[tuple[list[nn.Parameter], float]]:
        """The encoder trains at ``min(encoder_lr_scale, encoder_lr_max / lr)`` times the run's rate (W_PE at the run's)."""
        scale = self.encoder_lr_scale
        if self.encoder_lr_max is not None:
            scale = min(scale, self.encoder_lr_max / lr)
        return [(self.encoder_parameters(), scale)] if scale != 1.0 else []

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder network's parameters: the released code's ``pe_model``, clipped on its own (W_PE sits in
        the backbone's attention there and is clipped with it)."""
        return list(self.encoder.parameters())

    def draw(self, generator: torch.Generator, *, shifted: bool = False) -> RegularizerDraws | None:
        """The regularizers' positions of a training forward (:meth:`SeqPERegularizer.draw`), drawn from
        ``generator`` as the forward itself would; None in eval mode or without regularizers."""
        if not self.training or self.regularizer is None:
            return None
        return self.regularizer.draw(generator, shifted=shifted)

    def fill_state(self, state: PEState, *, generator: torch.Generator | None, shifted: bool) -> None:
        """Encode query and key positions in one call; in training, with the regularizers' sets (``state.draws``,
        or drawn from ``generator``)."""
        pos_q = state.pos_q
        same = state.pos_k is pos_q
        if not self.training and not same:  # decoding: keys are encoded lazily, only those a layer needs
            state.tensors["e_q"] = self._table_rows(pos_q)
            return
        main = pos_q if same else torch.cat([pos_q, state.pos_k], dim=1)
        # Compiled, the encoder cannot deduplicate: rows known to be alike (from the layout) are encoded once.
        once = torch.compiler.is_compiling() and state.shared_rows and main.shape[0] > 1
        rows_in = main[:1] if once else main
        if self.training and self.regularizer is not None:
            step = self.regularizer.step(self.encoder, rows_in, generator or torch.default_generator, shifted=shifted,
                                         draws=state.draws)  # the draws made ahead, else drawn from the generator
            emb, state.aux_loss, state.logs = step.embeddings, step.loss, dict(step.parts)
        else:
            emb = self.encoder(rows_in)  # (b, n [+ m], d)
        if once:
            emb = emb.expand(main.shape[0], -1, -1)
        # The collapse signals describe the training positions: a shifted step's rows start far apart (their
        # spread would read as health), so it logs none. Rows at the same positions: one row says it all.
        if self.training and self.diagnostics and not shifted:
            rows = slice(0, 1) if state.shared_rows else slice(None)
            state.logs.update(self._collapse_signal(main[rows], emb[rows]))
        n = pos_q.shape[1]
        state.tensors["e_q"] = emb[:, :n]
        state.tensors["e_k"] = emb if same else emb[:, n:]

    @torch.no_grad()
    def _collapse_signal(self, pos: Tensor, emb: Tensor) -> dict[str, Tensor]:
        """``pe_spread`` (the collapse test) and ``pe_cos`` (kept for old logs) of this step's distinct positions:
        with encoder dropout, on a clean (eval-mode) encoding of them, since dropout noise would hide a collapse;
        never through the inference table. 0-dim tensors, no sync. Compiled, the positions are picked in static
        shapes (:func:`spaced_rows`; the same ones where no position repeats)."""
        keep = None
        if torch.compiler.is_compiling():
            rows, keep = spaced_rows(pos)
        else:
            rows = distinct_rows(pos)
        if self.encoder.config["dropout"] == 0:
            sample = emb.detach().reshape(-1, emb.shape[-1])[rows.to(emb.device)]
        else:
            was = self.encoder.training
            self.encoder.train(False)
            try:
                sample = self.encoder.encode_unique(pos.reshape(-1, pos.shape[-1])[rows])
            finally:
                self.encoder.train(was)
        return {"pe_cos": _mean_cosine(sample, keep), "pe_spread": self.position_spread(sample, keep)}

    @torch.no_grad()
    def position_spread(self, emb: Float[Tensor, "k d"], keep: Bool[Tensor, " k"] | None = None) -> Float[Tensor, ""]:
        """``pe_spread`` of the encoder's embeddings of ``k`` distinct positions (those ``keep`` marks, default
        all): for the attention integrations ``position_score_spread`` through layer 0's W_PE (attention-logit
        units; for attn_mul, where e^q and e^k gate q and k rather than add a score, a proxy that is still 0
        exactly when every position looks the same), for input_add ``embedding_spread``. Compare with
        COLLAPSED_SPREAD."""
        if self.integration == "input_add":
            return embedding_spread(emb, keep)
        w_pe = self.w_pe[0]
        with torch.autocast(emb.device.type, enabled=False):  # full precision: a bf16 shared term would fake spread
            proj = w_pe(emb.to(w_pe.weight.dtype)).float()  # the module, so any bias counts; (k, 2·h·e)
        e_q, e_k = proj.unflatten(-1, (2, self.num_heads, self.head_dim)).permute(1, 2, 0, 3)  # 2 × (h, k, e)
        return position_score_spread(e_q, e_k, keep)

    def embed(self, state: PEState) -> Float[Tensor, "b n d"] | None:
        """input_add: the SeqPE embedding of each query position; None for attention integrations."""
        return state.tensors["e_q"] if self.integration == "input_add" else None

    def heads_pe(self, state: PEState, side: Literal["q", "k"], layer: int, rows: int) -> Float[Tensor, "b h r e"]:
        """``E^q`` or ``E^k`` (Eq. 11) of the last ``rows`` positions, split across heads."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for {self.num_layers} layers")
        lk = layer if self.per_layer else 0

        def project() -> Tensor:
            he = self.num_heads * self.head_dim
            rows_of = slice(None, he) if side == "q" else slice(he, None)
            w_pe = self.w_pe[lk]
            bias = None if w_pe.bias is None else w_pe.bias[rows_of]
            e = F.linear(self._embeddings(state, side, rows), w_pe.weight[rows_of], bias)  # (b, r, h*e)
            return e.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (b, h, r, e)

        return state.memo(("w_pe", side, lk, rows), project)

    def _embeddings(self, state: PEState, side: Literal["q", "k"], rows: int) -> Float[Tensor, "b r d"]:
        """The encoder's embeddings of the last ``rows`` query or key positions (keys encoded on first use:
        a decoding step with kept keys encodes only its new ones)."""
        if side == "k" and "e_k" not in state.tensors:
            def encode() -> Tensor:
                if rows <= state.pos_q.shape[1] and state.keys_are_queries():  # decoding: the new keys are the queries
                    return state.tensors["e_q"][:, -rows:]
                return self._table_rows(state.pos_k[:, -rows:])

            return state.memo(("e_k", rows), encode)
        return state.tensors[f"e_{side}"][:, -rows:]

    def _table_rows(self, pos: Int[Tensor, "b n w"]) -> Float[Tensor, "b n d"]:
        """The encoder's embeddings of ``pos``; for consecutive 1-D positions shared by the rows (a text context)
        in inference, a view of its table (no gather), expanded over the rows (not while compiling: the check
        reads values)."""
        b, n = pos.shape[:2]
        if pos.shape[-1] == 1 and not self.training and not torch.compiler.is_compiling():
            start = int(pos[0, 0, 0])
            steps = torch.arange(start, start + n, device=pos.device)
            if torch.equal(pos[..., 0], steps.expand(b, n)):
                return self.encoder.span(start, n).expand(b, -1, -1)
        return self.encoder(pos)

    shared_scores: bool = True
    """attn_bias with one W_PE, in inference: decoding steps add Eq. 14's position term as one bias shared by
    the layers (``attend``); False widens q and every key in each layer, as training and the prompt do."""

    @property
    def transforms_keys(self) -> bool:
        """attn_bias with one W_PE in inference leaves keys as they are: a decoding step adds the position
        scores as one bias shared by every layer (``attend``), so no cache needs widened keys."""
        return self.integration != "input_add" and not self._shared_position_scores()

    def _shared_position_scores(self) -> bool:
        """Eq. 14's position term ``E^q_i · E^k_j`` is then the same in every layer."""
        return self.shared_scores and not self.training and self.integration == "attn_bias" and not self.per_layer

    def attend(
        self,
        q: Float[Tensor, "b h n e"],
        k: Float[Tensor, "b h mk e"],
        v: Float[Tensor, "b h mk ev"],
        state: PEState,
        layer: int,
        *,
        causal: bool,
        key_padding_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        scale: float | None = None,
        cache: KVCache | None = None,
    ) -> Float[Tensor, "b h n ev"]:
        """As the base class; except that a few queries over many raw keys (a decoding step, attn_bias with one
        W_PE, in inference) get Eq. 14 as ``q·k`` plus a bias ``E^q_i · E^k_j`` computed once for all layers,
        rather than q and every key widened in every layer (which reads each cached key twice as wide).

        The bias is ``(E^q_i W_k) · e_j`` with ``e_j`` the encoder's embedding of key ``j`` (its inference
        table), so no key is projected: per step one product with the ``m`` keys' embeddings."""
        n, m = q.shape[-2], state.pos_k.shape[1]
        if cache is not None or not self._shared_position_scores() or 8 * n > m or k.shape[-2] != m:
            return super().attend(q, k, v, state, layer, causal=causal, key_padding_mask=key_padding_mask,
                                  dropout_p=dropout_p, scale=scale, cache=cache)
        if n != state.pos_q.shape[1]:
            raise ValueError(f"q has {n} tokens but state.pos_q has {state.pos_q.shape[1]} positions")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        key = ("position-scores", causal, q.dtype, scale)
        bias = state.memo(key, lambda: self._position_scores(state, causal, key_padding_mask, scale).to(q.dtype))
        return sdpa(q, k, v, attn_mask=bias, scale=scale)

    def _position_scores(
        self, state: PEState, causal: bool, key_padding_mask: Tensor | None, scale: float
    ) -> Float[Tensor, "b h n m"]:
        """``scale · E^q_i · E^k_j`` for every query and key, masked (-inf where a query may not look).

        With W_PE's bias, ``E^k_j = W_k e_j + b_k``, so the scores are ``(E^q_i W_k) · e_j + E^q_i · b_k``."""
        n, m, h, e = state.pos_q.shape[1], state.pos_k.shape[1], self.num_heads, self.head_dim
        w_k = self.w_pe[0].weight[h * e :].view(h, e, -1)  # the E^k rows of W_PE, per head
        e_q = self.heads_pe(state, "q", 0, n)  # (b, h, n, e)
        u = torch.matmul(e_q, w_k)  # E^q_i W_k, (b, h, n, d)
        e_k = self._embeddings(state, "k", m)  # (b, m, d): the encoder's table
        b = u.shape[0]
        if state.shared_rows:  # every row's keys are row 0's: one GEMM for every row, head and query
            scores = (u.reshape(-1, u.shape[-1]) @ e_k[0].T).view(b, h, n, m)
        else:
            scores = torch.bmm(u.reshape(b, h * n, -1), e_k.transpose(1, 2)).view(b, h, n, m)
        b_k = self.w_pe[0].bias
        if b_k is not None:  # one number per query: constant over keys, kept so the scores are Eq. 14's exactly
            scores = scores + (e_q * b_k[h * e :].view(h, 1, e)).sum(-1, keepdim=True)
        scores = scores.float() * scale
        mask = visibility_mask(n, m, causal=causal, key_padding_mask=key_padding_mask, device=scores.device)
        return scores if mask is None else scores.masked_fill(~mask, float("-inf"))

    def transform_qk(
        self, q: Float[Tensor, "b h n e"], k: Float[Tensor, "b h mk e"], state: PEState, layer: int
    ) -> tuple[Float[Tensor, "b h n eq"], Float[Tensor, "b h mk eq"]]:
        """Eq. 12/13/14 as q/k transforms (k holds the last ``mk`` keys of ``state.pos_k``)."""
        if self.integration == "input_add":
            return q, k
        e_q = self.heads_pe(state, "q", layer, q.shape[-2])
        e_k = self.heads_pe(state, "k", layer, k.shape[-2])
        return integrate(q, e_q, self.integration), integrate(k, e_k, self.integration)


# --- config ----------------------------------------------------------------------------------------

class SeqPEConfig(MethodConfig):
    """SeqPE: a learned sequential encoder of position digits, plus its regularizers."""

    method: Literal["seqpe"] = "seqpe"
    integration: Integration = "attn_bias"
    """How PEs enter the model: Eq. 12 (attn_sum), 13 (attn_mul), 14 (attn_bias), or input_add."""
    per_layer: bool = False
    """One W_PE^{q,k} per layer, or one shared by all layers (the paper's LM setting)."""
    w_pe_bias: bool = True
    """W_PE^{q,k} with a bias, as released (text ``bias=True``; images ``bias=qkv_bias``, True in timm's ViT)."""
    w_pe_std: float = Field(0.02, gt=0.0)
    """Std of W_PE^{q,k}'s init (normal or trunc_normal, as ``init``; bias zero): the released 0.02."""
    hidden: PositiveInt | None = None
    """Encoder width; default (None) the model's ``d_model``, so a small model gets a small encoder (the paper's 768
    for text and 384 for images are its models' widths)."""
    layers: PositiveInt = 2
    """Encoder transformer layers."""
    heads: PositiveInt | None = None
    """Encoder attention heads; default hidden // 64 (at least 1)."""
    mlp_ratio: float = Field(4.0, gt=0.0)
    """Encoder MLP width ratio."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Residual dropout in the encoder blocks (none on the summed input embeddings, as released)."""
    causal: bool = True
    """Causal attention over the digit tokens (the paper's default)."""
    init: Literal["normal", "trunc_normal"] = "normal"
    """Encoder weight init, std 0.02: normal (text) or trunc_normal cut at ±2 absolute (images, as released)."""
    qk_norm: bool = False
    """QK-LayerNorm in the encoder's attention (not in the released encoder; it bounds the attention logits, but
    alone does not let the encoder learn at 3e-3: benchmarks/results/encoder_lr.md)."""
    encoder_lr_scale: float = Field(1.0, gt=0.0)
    """The encoder's learning rate as a multiple of the run's (warmup and decay apply alike). It reaches an
    optimizer through its parameter groups: the trainer's, or ``param_groups(model, lr, weight_decay)`` from
    ``seqpe_nd.tasks.engine.param_groups`` for one of your own (a plain ``AdamW(model.parameters())`` ignores it,
    and ``encoder_lr_max`` too)."""
    encoder_lr_max: float | None = Field(3e-4, gt=0.0)
    """The encoder's peak learning rate at most (its scale becomes ``min(encoder_lr_scale, encoder_lr_max /
    train.lr)``; None: no cap). Under Adam the encoder learns even its own objective worse as its rate rises:
    trained on α·L_δ + β·L_OOD alone (no task, 600 steps), L_δ reaches 1.35 of a 2.74 chance at 3e-4, 1.76 at
    1e-3 and stays at chance at 3e-3, where [CLS]'s first-layer attention sits entirely on itself; warmup,
    QK-LayerNorm, 4× larger regularizer batches, Adam's eps or β₂ leave it at 2.28-2.74
    (benchmarks/results/encoder_lr.md). The paper's runs were below the cap for text (5e-5) and at 1.2e-3
    with batch 1024 and 25k warmup steps for images; a small model's 3e-4 … 3e-3 keeps the encoder at 3e-4
    without a per-run value."""
    alpha: float = Field(0.1, ge=0.0)
    """Weight of L_δ (Eq. 9, 15); 0 disables it."""
    beta: float = Field(0.1, ge=0.0)
    """Weight of L_OOD (Eq. 10, 15); 0 disables it. At ``ood_reduction: mean`` it is the paper's β."""
    ood_heads: PositiveInt | None = None
    """Heads the embeddings split into for L_OOD; default the model's attention heads."""
    symmetric_kl: bool = True
    """L_OOD as KL(T‖S) + KL(S‖T), both with the teacher detached, as the released criterion does
    (``pe_criterion.py``: twice the pull of Eq. 10 at the same β); False: Eq. 10's one-directional KL(SG(P)‖S)."""
    ood_reduction: OODReduction = "mean"
    """L_OOD's scale: ``mean`` = the released ``kl_div(reduction="mean")`` (per-row KL sum ÷ m teachers,
    averaged over rows, heads and regions), the scale the paper's β was tuned at; ``batchmean`` = the
    per-row KL sum averaged, m times larger (32× text, 64× images at the paper's settings)."""

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        self.check_regularizers(space, sizes)
        encoder = SeqPE(space, sizes.d_model, hidden=self.hidden, layers=self.layers, heads=self.heads,
                        mlp_ratio=self.mlp_ratio, dropout=self.dropout, causal=self.causal, init=self.init,
                        qk_norm=self.qk_norm)
        regularizer = None
        if self.alpha > 0 or self.beta > 0:
            regularizer = SeqPERegularizer(space, alpha=self.alpha, beta=self.beta,
                                           ood_heads=self.ood_heads or sizes.num_heads, symmetric_kl=self.symmetric_kl,
                                           ood_reduction=self.ood_reduction)
        return SeqPEEncoding(encoder=encoder, regularizer=regularizer, integration=self.integration,
                             per_layer=self.per_layer, w_pe_bias=self.w_pe_bias, w_pe_std=self.w_pe_std,
                             encoder_lr_scale=self.encoder_lr_scale, encoder_lr_max=self.encoder_lr_max,
                             **sizes.attention)

    def check_regularizers(self, space: GridSpace | HybridSpace, sizes: Sizes) -> None:
        """What would make the first training step's regularizer sampling fail, named now (the field, the value,
        the allowed range), before any weight is built."""
        if self.beta > 0:
            try:
                space.check_ood_reach()
            except ValueError as err:
                raise ValueError(f"pe.beta = {self.beta} trains L_OOD, but space: {err} (or set pe.beta: 0)") from None
            heads = self.ood_heads or sizes.num_heads
            if sizes.d_model % heads:
                field = "pe.ood_heads" if self.ood_heads else "the model's num_heads (pe.ood_heads unset)"
                raise ValueError(f"{field} = {heads} must divide d_model = {sizes.d_model}: L_OOD splits the "
                                 "embeddings into that many heads")
        if self.alpha > 0 and space.regularizer_volume() < 2:
            raise ValueError(
                f"pe.alpha = {self.alpha} trains L_δ, which needs at least 2 positions within L_max to contrast; this "
                f"space has {space.regularizer_volume()} (raise L_max or set pe.alpha: 0)"
            )
