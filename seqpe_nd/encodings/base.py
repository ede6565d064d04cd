"""The one interface every position encoding implements, and the attention call it drives.

Legend: ``b`` batch, ``n``/``m`` query/key tokens, ``w`` position width (coordinates per
position), ``h`` heads, ``e`` head dim, ``d`` model dim.

An adapter never asks which method it holds. Per backbone forward it calls

    state = pe.prepare(pos_q, pos_k)            # once: everything shared by all layers
    x = tok_emb + pe.embed(state)               # if not None (APE, SeqPE input_add)
    out = pe.attend(q, k, v, state, layer, causal=True)   # every layer, instead of SDPA

and adds ``state.aux_loss`` (SeqPE's regularizers, Eq. 15) to its loss when it is not None.
Positions are explicit integer coordinates, never the index in the sequence, so a shifted
start, a padded batch, a hybrid sequence and a key-value cache share one code path.

Inside ``attend`` the three hooks run in a fixed order: ``transform_qk`` (RoPE, SeqPE
attn_sum/attn_mul/attn_bias), then either FlexAttention with ``score_mod`` (ALiBi on a GPU) or
``F.scaled_dot_product_attention`` with at most one dense bias per forward built from that same
``score_mod``. Methods that only transform q/k keep the fused SDPA kernels (``is_causal`` when
there is no cache and no padding).
"""

import math
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``."""

ScoreBackend = Literal["auto", "flex", "bias"]

PEDraws = Any
"""What a position encoding's ``draw`` returned: the random inputs of its training forward, drawn ahead of it
(SeqPE: ``seqpe_nd.regularizers.RegularizerDraws``); each method reads only its own."""


def host_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s values costs nothing: a CPU tensor outside ``torch.compile``. Input checks on values
    run only then; on an accelerator they would be a device sync per forward, and under compilation a graph break."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def same_rows(pos: Tensor) -> bool:
    """Whether every row (batch entry) of ``pos`` is the same: known from the layout for one row or a broadcast
    (``expand``) batch, the usual case and free everywhere; read from the values only where that is free."""
    if pos.shape[0] == 1 or pos.stride(0) == 0:
        return True
    return host_readable(pos) and bool((pos == pos[:1]).all())


@dataclass(eq=False)
class PEState:
    """What ``prepare`` computed once for one backbone forward, shared by all layers.

    ``pos_q`` are the positions of the queries of this forward; ``pos_k`` those of ALL keys
    the queries attend to (cached keys first). ``tensors`` holds per-method values (RoPE's
    cos/sin, SeqPE's embeddings); ``aux_loss`` is a loss the caller must add (SeqPE's
    α·L_δ + β·L_OOD) or None.
    """

    pos_q: Int[Tensor, "b n w"]
    pos_k: Int[Tensor, "b m w"]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None
    logs: dict[str, float | Tensor] = field(default_factory=dict)
    """Scalars worth logging, 0-dim detached tensors where a float would cost a device sync
    (SeqPE in training: ``loss_delta``, ``loss_ood``, ``loss_reg``, ``pe_spread``, ``pe_cos``)."""
    shared_rows: bool = False
    """All batch rows carry the same positions, so one ``[h, n, m]`` bias serves the batch."""
    draws: PEDraws | None = None
    """The random inputs ``prepare`` was given (from the encoding's ``draw``), or None: drawn from its generator."""
    grid: tuple[int, ...] | None = None
    """The grid every row's positions fill exactly (row-major, from the origin) when the caller knows it from shapes
    (a ViT's patch grid without offsets): an extent known without reading a position's value."""
    _memo: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per forward; later layers get the stored value."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def keys_are_queries(self) -> bool:
        """Whether the last ``n`` key positions are the ``n`` query positions (self-attention, or a
        decoding step whose new keys are its queries), so per-key work can reuse the queries'."""
        if self.pos_k is self.pos_q:
            return True
        n = self.pos_q.shape[1]
        return self.memo(("keys-are-queries",), lambda: n <= self.pos_k.shape[1]
                         and torch.equal(self.pos_k[:, -n:], self.pos_q))

    def evenly_spaced(self) -> bool:
        """Whether this is self-attention over positions ``p_0 + i·Δ`` with one step ``Δ`` in every row
        (each row may start elsewhere): then ``p_i - p_j`` depends on ``i - j`` alone."""

        def check() -> bool:
            p = self.pos_q
            if p.shape != self.pos_k.shape or not self.keys_are_queries():
                return False
            step = p[:, 1:] - p[:, :-1]
            return bool((step == step[:1, :1]).all())

        return self.memo(("evenly-spaced",), check)


def draws_of(model: nn.Module, generator: torch.Generator, *, shifted: bool = False) -> PEDraws | None:
    """``draw`` of the position encoding inside ``model`` (under any wrapper: its outermost one, which the
    backbone prepares), for the model's next forward; None when it draws nothing or there is none."""
    outer: list[PositionEncoding] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, PositionEncoding):
            outer.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    draws = [d for d in (pe.draw(generator, shifted=shifted) for pe in outer) if d is not None]
    if len(draws) > 1:
        raise ValueError(f"the model holds {len(draws)} position encodings that draw; pass each its own draws")
    return draws[0] if draws else None


def pe_metrics(aux_loss: Tensor | None, logs: dict[str, float | Tensor] | None) -> dict[str, float | Tensor]:
    """A recipe's PE metrics: ``pe_aux_loss`` and the PE's own logs, as detached 0-dim tensors (no sync)."""
    out: dict[str, float | Tensor] = {}
    if aux_loss is not None:
        out["pe_aux_loss"] = aux_loss.detach()
    for name, value in (logs or {}).items():
        out[name] = value.detach() if isinstance(value, Tensor) else value
    return out


class KVCache:
    """Keys (already position-transformed), values and key positions for incremental decoding.

    For adapters that own their cache. Per decoding step::

        pos_k, mask = cache.extend(pos_new, mask_new)   # all key positions so far
        state = pe.prepare(pos_new, pos_k)
        ... pe.attend(q, k_new, v_new, state, layer, causal=True, key_padding_mask=mask, cache=cache)

    Keys are cached after ``transform_qk``, so a cached key keeps the rotation / PE of its own
    position and decoding equals the full forward.
    """

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.positions: Tensor | None = None
        self.key_padding_mask: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def extend(
        self, pos: Int[Tensor, "b n w"], key_padding_mask: Bool[Tensor, "b n"] | None = None
    ) -> tuple[Int[Tensor, "b m w"], Bool[Tensor, "b m"] | None]:
        """Append the new tokens' positions (and padding mask); return those of all keys."""
        old = len(self)
        self.positions = pos if self.positions is None else torch.cat([self.positions, pos], dim=1)
        if key_padding_mask is not None or self.key_padding_mask is not None:
            b = pos.shape[0]
            prev = self.key_padding_mask
            if prev is None:
                prev = torch.ones(b, old, dtype=torch.bool, device=pos.device)
            new = (
                key_padding_mask
                if key_padding_mask is not None
                else torch.ones(b, pos.shape[1], dtype=torch.bool, device=pos.device)
            )
            self.key_padding_mask = torch.cat([prev, new], dim=1)
        return self.positions, self.key_padding_mask

    def update(
        self, layer: int, k: Float[Tensor, "b h n e"], v: Float[Tensor, "b h n ev"]
    ) -> tuple[Float[Tensor, "b h m e"], Float[Tensor, "b h m ev"]]:
        """Append this layer's new (transformed) keys and values; return all of them."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def visibility_mask(
    n: int, m: int, *, causal: bool, key_padding_mask: Bool[Tensor, "b m"] | None, device: torch.device
) -> Bool[Tensor, "_ 1 n m"] | None:
    """Which keys each query may see (True = attend); None when plain SDPA flags suffice.

    Queries are the LAST ``n`` of the ``m`` tokens (bottom-right alignment), so with a cache
    query ``i`` sees keys ``0 … m - n + i``. SDPA's ``is_causal`` aligns top-left, which is only
    right when ``n == m``: that case returns None and the caller uses ``is_causal``. One query
    (a decoding step) is the last token and sees every key: None as well, no mask to apply.
    """
    if key_padding_mask is None and (not causal or n == m or n == 1):
        return None
    mask = torch.ones(1, 1, n, m, dtype=torch.bool, device=device)
    if causal:
        mask = (torch.arange(m, device=device) <= torch.arange(n, device=device)[:, None] + (m - n))[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
        # A query that sees only padding (a left-pad token) would give NaN; its output is never used.
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask


CAUSAL_BLOCK = 512
"""Queries per block of a long causal attention with a dense score bias (see ``PositionEncoding._causal_blocks``)."""


def materialize_score_mod(
    score_mod: ScoreMod, batch: int, heads: int, n: int, m: int, device: torch.device, q0: int = 0
) -> Float[Tensor, "_ h n m"]:
    """The dense float32 bias ``score_mod(0, b, h, i, j)`` for every (b, h, i, j), by broadcasting
    (queries ``q0 … q0 + n - 1``, keys ``0 … m - 1``)."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    qi = torch.arange(q0, q0 + n, device=device).view(1, 1, n, 1)
    ki = torch.arange(m, device=device).view(1, 1, 1, m)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return score_mod(zero, b, h, qi, ki).float().expand(batch, heads, n, m)


def sdpa(
    q: Float[Tensor, "b h n e"], k: Float[Tensor, "b h m e"], v: Float[Tensor, "b h m ev"], **kwargs: Any
) -> Float[Tensor, "b h n ev"]:
    """``F.scaled_dot_product_attention``, with ``v`` zero-padded to q's width when q/k were widened
    (SeqPE attn_bias by concatenation): fused kernels want one head dim for q, k and v, and the
    padded half of the output is exactly zero (measured on CPU: 3.4× faster at L = 2048 than the
    math fallback the mismatch triggers). A few queries over many keys (a decoding step) skip the
    padding, which would copy every cached value: there the math path is the cheaper one."""
    ev = v.shape[-1]
    if ev >= q.shape[-1]:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if 8 * q.shape[-2] <= k.shape[-2] and not kwargs.get("dropout_p") and not kwargs.get("is_causal"):
        return _few_queries(q, k, v, attn_mask=kwargs.get("attn_mask"), scale=kwargs.get("scale"))
    v = F.pad(v, (0, q.shape[-1] - ev))
    return F.scaled_dot_product_attention(q, k, v, **kwargs)[..., :ev]


def _few_queries(
    q: Float[Tensor, "b h n e"], k: Float[Tensor, "b h m e"], v: Float[Tensor, "b h m ev"], *,
    attn_mask: Tensor | None, scale: float | None,
) -> Float[Tensor, "b h n ev"]:
    """Attention written out for a few queries over many keys (a decoding step): the (n, m) scores are
    small, and neither keys nor values are copied (SDPA's math path scales a copy of k)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


_compiled_flex: Callable[..., Tensor] | None = None


def _flex(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
    global _compiled_flex
    if not q.is_cuda:
        with warnings.catch_warnings():  # eager on purpose: compiling for CPU buys nothing here
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, **kwargs)  # forward only on CPU
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, **kwargs)


class PositionEncoding(nn.Module):
    """Base class: every hook is a no-op, so NoPE is this class unchanged.

    Subclasses fill per-forward tensors in ``fill_state`` (``prepare`` calls it) and override any of the hooks.
    """

    method: str = "nope"
    diagnostics: bool = True
    """Whether training forwards also compute the logs that cost compute of their own (SeqPE's ``pe_spread``
    and ``pe_cos``, an extra encoder pass with dropout); the trainer turns this on for the steps whose logs it
    writes, off for the rest."""
    score_backend: ScoreBackend = "auto"
    """Where ``score_mod`` runs: FlexAttention (``flex``), one dense bias (``bias``), or
    ``auto`` = FlexAttention on CUDA, the dense bias elsewhere (CPU FlexAttention has no backward)."""

    spec: Any = None
    """The ``PESpec`` (config and position space) this encoding was built from; ``build_position_encoding`` sets
    it, and a model saved with ``save_pretrained`` records it. None for an encoding constructed by hand."""

    def __init__(self, *, num_heads: int, head_dim: int, num_layers: int, width: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_layers, self.width = num_heads, head_dim, num_layers, width

    def check_fits(self, *, num_layers: int, num_heads: int, head_dim: int, model: str = "the model") -> None:
        """One error naming both shapes when this encoding was sized for another backbone (build it with the
        backbone's sizes, e.g. ``**pe_sizes(model)``)."""
        if (self.num_layers, self.num_heads, self.head_dim) != (num_layers, num_heads, head_dim):
            raise ValueError(
                f"PE sized for {self.num_layers} layers x {self.num_heads} heads x {self.head_dim} dims, {model} has "
                f"{num_layers} x {num_heads} x {head_dim}"
            )

    def lr_scales(self, lr: float) -> list[tuple[list[nn.Parameter], float]]:
        """Parameters of this encoding that train at their own multiple of the run's peak rate ``lr``, as
        ``(parameters, scale)`` pairs (none by default; SeqPE: its encoder, from ``encoder_lr_scale`` and
        ``encoder_lr_max``). ``seqpe_nd.tasks.engine.param_groups.param_groups`` builds the optimizer groups from it."""
        return []

    def reset_buffers(self) -> None:
        """Recompute this module's non-persistent buffers (derived from its arguments, never saved).

        A meta-device build, ``to_empty`` or Hugging Face's ``from_pretrained`` (which replaces every non-persistent
        buffer by uninitialised memory and re-fills only those its ``_init_weights`` knows) leave them empty; the
        constructor fills them through this same method. None here; ALiBi's slopes, RoPE's frequencies and SeqPE's
        digit tables override it.
        """

    # -- per forward ----------------------------------------------------------------------
    def prepare(
        self,
        pos_q: Int[Tensor, "b n w"],
        pos_k: Int[Tensor, "b m w"] | None = None,
        *,
        generator: torch.Generator | None = None,
        shifted: bool = False,
        draws: PEDraws | None = None,
        grid: tuple[int, ...] | None = None,
    ) -> PEState:
        """Once per backbone forward: check positions, compute what all layers share.

        Args:
            pos_k: positions of all keys (cached ones first); None means the queries themselves.
            generator: randomness for training-time work (SeqPE's regularizer samplers).
            shifted: this step's main positions were randomly shifted (SeqPE skips L_OOD then).
            draws: instead of ``generator``, what ``draw(generator, shifted=shifted)`` returned before the
                forward: the same forward, with no generator inside it (``torch.compile`` cannot trace one).
            grid: the grid ``pos_q`` (= ``pos_k``) fills exactly, when known from shapes (see ``PEState.grid``).
        """
        if draws is not None and generator is not None:
            raise ValueError("pass the PE a generator or its draws, not both")
        state = self._new_state(pos_q, pos_k)
        state.draws, state.grid = draws, grid
        self.fill_state(state, generator=generator, shifted=shifted)
        return state

    def draw(self, generator: torch.Generator, *, shifted: bool = False) -> PEDraws | None:
        """The random inputs a training forward of this encoding takes from its generator, drawn now from
        ``generator`` in the order the forward would draw them (None here: nothing is drawn). Passed to
        ``prepare(draws=...)`` (a backbone's ``pe_draws``), the forward gives what ``generator`` would have."""
        return None

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of a position network of the method's own (SeqPE's encoder), which the released recipe
        clips on their own gradient norm (``train.clip_grad_pe``); none for a method without one."""
        return []

    def fill_state(self, state: PEState, *, generator: torch.Generator | None, shifted: bool) -> None:
        """Subclass hook of ``prepare``: put per-forward tensors (and any aux loss) in ``state``."""

    def _new_state(self, pos_q: Tensor, pos_k: Tensor | None) -> PEState:
        if pos_k is None:
            pos_k = pos_q
        for name, pos in (("pos_q", pos_q), ("pos_k", pos_k)):
            if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
                raise ValueError(f"{name} must hold integer positions, got dtype {pos.dtype}")
            if pos.ndim != 3:
                raise ValueError(f"{name} must have shape (batch, tokens, {self.width}), got {tuple(pos.shape)}")
            if pos.shape[-1] != self.width:
                raise ValueError(
                    f"{name} has {pos.shape[-1]} coordinates per position, but this {self.method} encoding's "
                    f"space has width {self.width}"
                )
        if pos_q.shape[0] != pos_k.shape[0]:
            raise ValueError(f"pos_q and pos_k disagree on batch size: {pos_q.shape[0]} vs {pos_k.shape[0]}")
        for name, pos in (("pos_q", pos_q), ("pos_k", pos_k)):  # a value check: eager CPU only (no device sync)
            if host_readable(pos) and pos.numel() and bool((pos < 0).any()):  # -1 would alias a table's last row
                raise ValueError(f"{name} has a negative coordinate ({int(pos.min())}); positions must be >= 0")
        return PEState(pos_q=pos_q, pos_k=pos_k, shared_rows=same_rows(pos_q) and same_rows(pos_k))

    # -- the three hooks ------------------------------------------------------------------
    def embed(self, state: PEState) -> Float[Tensor, "b n d"] | None:
        """Added to the input token embeddings (APE, SeqPE input_add); None for the rest."""
        return None

    def transform_qk(
        self, q: Float[Tensor, "b h n e"], k: Float[Tensor, "b h mk e"], state: PEState, layer: int
    ) -> tuple[Float[Tensor, "b h n eq"], Float[Tensor, "b h mk eq"]]:
        """Position-dependent q/k before attention; ``k`` holds the LAST ``mk`` keys of ``state.pos_k``."""
        return q, k

    def score_mod(self, state: PEState, layer: int) -> ScoreMod | None:
        """A FlexAttention ``score_mod`` adding a genuine score bias (ALiBi); None for the rest."""
        return None

    @property
    def transforms_keys(self) -> bool:
        """Whether a decoding cache should keep keys as ``transform_qk`` leaves them; False when ``attend``
        takes the cached keys as they are (no transform, or SeqPE's shared position scores in inference)."""
        return type(self).transform_qk is not PositionEncoding.transform_qk

    # -- attention ------------------------------------------------------------------------
    def attend(
        self,
        q: Float[Tensor, "b h n e"],
        k: Float[Tensor, "b h mk e"],
        v: Float[Tensor, "b h mk ev"],
        state: PEState,
        layer: int,
        *,
        causal: bool,
        key_padding_mask: Bool[Tensor, "b m"] | None = None,
        dropout_p: float = 0.0,
        scale: float | None = None,
        cache: KVCache | None = None,
    ) -> Float[Tensor, "b h n ev"]:
        """Position-aware attention for one layer; replaces the backbone's SDPA call.

        Args:
            k, v: keys/values of the last ``mk`` key positions: all ``m`` of them, or only the new
                ones when ``cache`` holds the rest.
            key_padding_mask: over all ``m`` keys, True = a real token.
            scale: softmax scale; default ``1/sqrt(e)`` of the ORIGINAL head dim, kept when
                ``transform_qk`` widens q/k (SeqPE attn_bias by concatenation).
            cache: append this layer's transformed keys and values and attend to all of them.
        """
        n, m = q.shape[-2], state.pos_k.shape[1]
        if q.shape[-2] != state.pos_q.shape[1]:
            raise ValueError(f"q has {n} tokens but state.pos_q has {state.pos_q.shape[1]} positions")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        q, k = self.transform_qk(q, k, state, layer)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if k.shape[-2] != m:
            raise ValueError(
                f"attention sees {k.shape[-2]} keys but state.pos_k has {m} positions; pass the cache or all keys"
            )
        if key_padding_mask is not None and key_padding_mask.shape[-1] != m:
            raise ValueError(f"key_padding_mask covers {key_padding_mask.shape[-1]} keys, expected {m}")
        dropout_p = dropout_p if self.training else 0.0

        mod = self.score_mod(state, layer)
        if mod is not None and self._use_flex(q, k, v, dropout_p):
            block_mask = state.memo(
                ("block_mask", causal, n, m), lambda: _block_mask(q, n, m, causal, key_padding_mask)
            )
            return _flex(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale)

        mask = state.memo(
            ("mask", causal, n, m),
            lambda: visibility_mask(n, m, causal=causal, key_padding_mask=key_padding_mask, device=q.device),
        )
        if mod is None:
            return sdpa(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None and n == m, scale=scale
            )
        if causal and mask is None and n == m and n >= 2 * CAUSAL_BLOCK:
            return self._causal_blocks(mod, state, q, k, v, layer=layer, dropout_p=dropout_p, scale=scale)
        # One dense float32 bias per forward, masked once; relative distances keep it exact
        # before the single cast to q's dtype (the released code cast absolute indices to bf16).
        key = ("bias", layer if self.bias_per_layer else None, causal, q.dtype)
        bias = state.memo(key, lambda: self._dense_bias(mod, state, mask, causal, q).to(q.dtype))
        return sdpa(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)

    bias_per_layer: bool = False
    """Whether ``score_mod`` differs between layers (ALiBi's does not: one bias per forward)."""

    def _use_flex(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
        if self.score_backend == "bias":
            return False
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if self.score_backend == "flex":
            if not q.is_cuda and needs_grad:
                raise ValueError(
                    "score_backend='flex' needs a GPU for training: FlexAttention has no backward on CPU "
                    "(use 'auto' or 'bias')"
                )
            if dropout_p > 0:
                raise ValueError("score_backend='flex' does not support attention dropout (use 'auto' or 'bias')")
            return True
        return q.is_cuda and dropout_p == 0.0

    def _dense_bias(self, mod: ScoreMod, state: PEState, mask: Tensor | None, causal: bool, q: Tensor) -> Tensor:
        n, m = state.pos_q.shape[1], state.pos_k.shape[1]
        bias = self._bias(mod, state, 0, n, m, q.device)
        if mask is None and causal and n == m:  # no padding, but is_causal cannot combine with a bias
            mask = torch.ones(1, 1, n, m, dtype=torch.bool, device=q.device).tril()
        return bias if mask is None else bias.masked_fill_(~mask, float("-inf"))

    def dense_bias(
        self, state: PEState, rows: int, queries: slice = slice(None), keys: int | None = None
    ) -> Float[Tensor, "r h n m"] | None:
        """The score bias of every (row, head, query, key) written directly, where a method knows a cheaper
        way than broadcasting its ``score_mod`` (the ``queries`` and the first ``keys`` keys); None (the
        default) broadcasts the ``score_mod``."""
        return None

    translation_invariant: bool = False
    """Whether ``score_mod`` depends on the two positions only through their difference (ALiBi's
    ``-m_h·|p_i - p_j|``). Along evenly spaced positions the bias is then a function of ``i - j``, the
    same in every row, and each block of a long causal attention is a window of the last block's bias."""

    def _bias(
        self, mod: ScoreMod, state: PEState, q0: int, q1: int, m: int, device: torch.device, rows: int | None = None
    ) -> Tensor:
        """The float32 bias of queries ``q0 … q1 - 1`` against the first ``m`` keys: the method's own
        ``dense_bias`` where it has one, else its ``score_mod`` broadcast (one row when rows share positions,
        or the first ``rows``)."""
        if rows is None:
            rows = 1 if state.shared_rows else state.pos_q.shape[0]
        bias = self.dense_bias(state, rows, slice(q0, q1), m)
        return bias if bias is not None else materialize_score_mod(mod, rows, self.num_heads, q1 - q0, m, device, q0=q0)

    def _causal_blocks(
        self, mod: ScoreMod, state: PEState, q: Tensor, k: Tensor, v: Tensor, *, layer: int, dropout_p: float,
        scale: float,
    ) -> Tensor:
        """A long causal self-attention with a score bias, a block of queries at a time: each block sees only
        the keys up to its last query (half the work of the full square) and its bias is built for that
        block alone (memory of one block, not of every query against every key).

        A translation-invariant bias over evenly spaced positions (ALiBi on a text sequence) is built once,
        for the last block (one row, ``CAUSAL_BLOCK`` queries by ``n`` keys, masked): block ``[a, z)`` is
        its window ``[B - (z - a):, n - z:]``, since both bias and mask depend on ``i - j`` alone."""
        n, size, per_layer = q.shape[-2], CAUSAL_BLOCK, layer if self.bias_per_layer else None
        # Once here rather than in every block's kernel: the fused kernel with a mask is about 15 % slower on
        # strided q/k/v (a backbone's heads split off one projection), measured at 4K tokens on a CPU.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

        def block_bias(a: int, z: int, rows: int | None = None) -> Tensor:
            bias = self._bias(mod, state, a, z, z, q.device, rows)
            seen = torch.ones(z - a, z, dtype=torch.bool, device=q.device).tril(a)
            return bias.masked_fill_(~seen, float("-inf")).to(q.dtype)

        def bias_of(a: int, z: int) -> Tensor:  # built once per forward and shared by the layers
            if self.translation_invariant and state.evenly_spaced():
                last = state.memo(("bias-window", per_layer, q.dtype), lambda: block_bias(n - size, n, rows=1))
                return last[..., size - (z - a):, n - z:]
            return state.memo(("bias-block", per_layer, a, q.dtype), lambda: block_bias(a, z))

        outs = []
        for a in range(0, n, size):
            z = min(n, a + size)
            outs.append(
                sdpa(q[:, :, a:z], k[:, :, :z], v[:, :, :z], attn_mask=bias_of(a, z), dropout_p=dropout_p, scale=scale)
            )
        return torch.cat(outs, dim=2)

    def extra_repr(self) -> str:
        return f"method={self.method}, heads={self.num_heads}, head_dim={self.head_dim}, layers={self.num_layers}"


def _block_mask(q: Tensor, n: int, m: int, causal: bool, key_padding_mask: Tensor | None) -> BlockMask | None:
    if not causal and key_padding_mask is None:
        return None
    off = m - n
    if key_padding_mask is None:
        return create_block_mask(lambda b, h, i, j: j <= i + off, None, None, n, m, device=q.device)
    kpm = key_padding_mask
    # Left-pad queries that would see nothing are given every key, as in visibility_mask.
    if causal:
        seen = (torch.arange(m, device=q.device) <= torch.arange(n, device=q.device)[:, None] + off)[None] & kpm[
            :, None, :
        ]
    else:
        seen = kpm[:, None, :].expand(-1, n, -1)
    blind = ~seen.any(-1)  # (b, n)

    def mask_mod(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        ok = kpm[b, j]
        if causal:
            ok = ok & (j <= i + off)
        return ok | blind[b, i]

    return create_block_mask(mask_mod, kpm.shape[0], None, n, m, device=q.device)
