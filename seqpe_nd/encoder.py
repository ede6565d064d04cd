"""The SeqPE position encoder (the paper's §3.2, Eq. 8): explicit positions in, embeddings out.

Legend: ``*b`` batch dims, ``w`` position width (coordinates per position), ``u`` distinct
positions, ``s`` token slots per position ([CLS] last), ``h`` heads, ``e`` head dim, ``c``
encoder width (``hidden``), ``d`` model dim (output), ``m`` table rows.

A position becomes digit tokens (``space.tokenize``); each slot's embedding is
``T[token] + O[place] + D[dim]`` (Eq. 7; [CLS] gets neither O nor D, 1-D spaces have no D); a
small pre-LN GPT-2-style transformer reads the slots and the output at [CLS] is the position's
embedding. Three things make it cheap to use inside a model:

* every call encodes each *distinct* position once (a batch of sequences that share positions
  costs one sequence), and :meth:`SeqPE.encode` serves main-task and regularizer positions of
  one step in a single batched encoder call;
* the last layer only computes the [CLS] query, the only output anyone reads;
* in eval mode without autograd, embeddings come from an inference table that is built once,
  extended on demand and dropped whenever a parameter changes (keyed on ``_version``).
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from seqpe_nd.positions import NONE_ID, GridSpace, HybridSpace, load_space

Space = GridSpace | HybridSpace
Init = Literal["normal", "trunc_normal"]

_TABLE_CHUNK = 8192  # positions per encoder call when filling the inference table
_GROW = 256  # a 1-D table past its box grows to the next multiple of this many positions


class Block(nn.Module):
    """Pre-LN transformer block as in GPT-2: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self, hidden: int, heads: int, mlp_ratio: float, dropout: float, causal: bool, qk_norm: bool = False
    ) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        # QK-LayerNorm (Dehghani et al., 2023; Wortsman et al., 2023): bounds the attention logits, whose growth
        # at large learning rates turns [CLS]'s attention one-hot onto itself and blinds it to the digits.
        self.q_norm = nn.LayerNorm(hidden // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(hidden // heads) if qk_norm else nn.Identity()
        self.ln_1 = nn.LayerNorm(hidden)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        inner = max(1, round(mlp_ratio * hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.drop = nn.Dropout(dropout)  # residual dropout, as in the released encoder

    def forward(self, x: Float[Tensor, "u s c"], *, last_only: bool = False) -> Float[Tensor, "u t c"]:
        """``last_only``: return only the last slot ([CLS]), the only output the final layer needs."""
        u, s, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=-1)
        k = self.k_norm(k.view(u, s, self.heads, c // self.heads)).transpose(1, 2)  # (u, h, s, e)
        v = v.view(u, s, self.heads, c // self.heads).transpose(1, 2)  # (u, h, s, e)
        if last_only:
            # [CLS] is the last slot: it sees every slot under causal and bidirectional attention alike.
            x, q = x[:, -1:], q[:, -1:]
        q = self.q_norm(q.reshape(u, x.shape[1], self.heads, c // self.heads)).transpose(1, 2)  # (u, h, t, e)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and not last_only)
        y = y.transpose(1, 2).reshape(u, x.shape[1], c)  # (u, t, c)
        x = x + self.drop(self.c_proj(y))
        return x + self.drop(self.mlp(self.ln_2(x)))


@dataclass
class _Table:
    """Inference cache: embeddings of a dense grid box, or of sorted position keys (hybrid)."""

    version: tuple[tuple[int, int], ...]
    emb: Tensor  # (m, d)
    box: tuple[int, ...] | None = None  # dense: extent per coordinate, rows are space.positions(box)
    box_strides: Tensor | None = None
    keys: Tensor | None = None  # sparse: sorted position keys, one per row of emb


class SeqPE(nn.Module):
    """Sequential position encoder: ``f_θ: Z^n → R^d`` for every position of ``space``.

    Args:
        space: the position space (grid of any dims, or hybrid); fixes the vocabulary, O and D.
        d_model: output width, the width the main model consumes.
        hidden: encoder width; default ``d_model`` (the paper's 768 for text and 384 for images are its
            models' widths).
        heads: attention heads; default ``hidden // 64`` (at least 1).
        causal: causal self-attention over the digit slots (the paper's default); False for
            bidirectional.
        dropout: residual dropout inside the blocks (none on the summed input embeddings, as released).
        init: ``normal`` = N(0, 0.02) (released text encoder), ``trunc_normal`` = N(0, 0.02) truncated
            at ±2 absolute (released image encoder's ``trunc_normal_(std=.02)``), for every Linear and
            Embedding weight.
    """

    def __init__(
        self,
        space: Space,
        d_model: int,
        *,
        hidden: int | None = None,
        layers: int = 2,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        causal: bool = True,
        init: Init = "normal",
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(space, (GridSpace, HybridSpace)):
            raise ValueError(f"space must be a GridSpace or HybridSpace (see load_space), got {type(space).__name__}")
        hidden = d_model if hidden is None else hidden
        heads = max(1, hidden // 64) if heads is None else heads
        for name, value in (("d_model", d_model), ("hidden", hidden), ("layers", layers), ("heads", heads)):
            if value < 1:
                raise ValueError(f"{name} = {value} is not allowed; it must be a positive integer")
        if hidden % heads:
            raise ValueError(f"hidden = {hidden} must be divisible by heads = {heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout = {dropout} is not allowed; it must be in [0, 1)")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio = {mlp_ratio} is not allowed; it must be > 0")
        if init not in ("normal", "trunc_normal"):
            raise ValueError(f"init = {init!r} is not allowed; choose 'normal' or 'trunc_normal'")
        self.space = space
        self.d_model = d_model
        self.config: dict[str, Any] = dict(
            d_model=d_model, hidden=hidden, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
            dropout=dropout, causal=causal, init=init, qk_norm=qk_norm,
        )

        # Eq. 7: U = T[token] + O[place] + D[dim]; [CLS] is row `cls_token` of T, with no O or D.
        self.tok = nn.Embedding(space.vocab_size, hidden)
        self.place = nn.Embedding(space.num_places, hidden)
        self.dim = nn.Embedding(space.num_dims, hidden) if space.num_dims > 0 else None  # 1-D: D = 0 (App. A.1)
        self.register_buffer("place_ids", torch.empty_like(space.place_ids), persistent=False)
        self.register_buffer("dim_ids", torch.empty_like(space.dim_ids), persistent=False)
        # No dropout on the summed T + O + D inputs: the released encoder has none there (only residual dropout).
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio, dropout, causal, qk_norm) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.apply(self._init_weights)

        # Position keys: mixed radix over each coordinate's range, for dedup and the table.
        self._radix = _radix(space)
        self._strides = _strides(self._radix) if math.prod(self._radix) < 2**62 else None
        if self._strides is not None:  # on the module's device: a GPU step copies no list to the device (a sync)
            self.register_buffer("key_strides", torch.empty(len(self._strides), dtype=torch.int64), persistent=False)
            self.register_buffer("key_radix", torch.empty(len(self._radix), dtype=torch.int64), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """The digit-slot ids and position-key radices, recomputed from the space, and the inference table dropped.

        They are non-persistent buffers (derived, never saved); a meta-device build or Hugging Face's
        ``from_pretrained`` leaves them uninitialised, and the constructor fills them through this method too.
        """
        with torch.no_grad(), torch.device("cpu"):
            self.place_ids.copy_(self.space.place_ids)
            self.dim_ids.copy_(self.space.dim_ids)
            if self._strides is not None:
                self.key_strides.copy_(torch.tensor(self._strides, dtype=torch.int64))
                self.key_radix.copy_(torch.tensor(self._radix, dtype=torch.int64))
        self._table: _Table | None = None
        self._param_list: list[nn.Parameter] | None = None

    def _init_weights(self, module: nn.Module, std: float = 0.02) -> None:
        """The released init of a Linear or Embedding: ``normal`` or ``trunc_normal`` weights at ``std``, zero bias."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if self.config["init"] == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=std)
            else:
                # timm/torch defaults a=-2, b=2 are absolute: at std 0.02 the cut is at ±100σ, as released.
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2.0, b=2.0)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- the encoder proper ---------------------------------------------------------------
    def slot_embedding(self) -> Float[Tensor, "s c"]:
        """O[place] + D[dim] of each token slot; zero where the space gives none ([CLS])."""
        slot = _masked_rows(self.place.weight, self.place_ids)
        if self.dim is not None:
            slot = slot + _masked_rows(self.dim.weight, self.dim_ids)
        return slot

    def encode_unique(self, pos: Int[Tensor, "u w"]) -> Float[Tensor, "u d"]:
        """Eq. 8 for each row of ``pos`` (checked by the caller), no dedup, no cache."""
        if pos.shape[0] == 0:
            return self.proj.weight.new_zeros(0, self.d_model)
        tokens = self.space.tokenize(pos, check=False)  # (u, s)
        x = self.tok(tokens) + self.slot_embedding()  # (u, s, c)
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=i == len(self.blocks) - 1)
        return self.proj(self.ln_f(x[:, -1]))  # output at [CLS]

    # -- public API -----------------------------------------------------------------------
    def forward(self, pos: Int[Tensor, "*b w"]) -> Float[Tensor, "*b d"]:
        """Embeddings of explicit positions; each distinct position is encoded once."""
        return self.encode(pos)[0]

    def encode(self, *pos_sets: Tensor) -> list[Tensor]:
        """One deduplicated encoder call for several position tensors of any leading shapes.

        Returns one ``(*b_i, d)`` tensor per input ``(*b_i, w)``; in eval mode without autograd
        the rows come from the inference table. Under ``torch.compile`` every row is encoded as it is (no
        deduplication, no table, no value check): the distinct rows are a data-dependent shape, and reading
        values on the host would break the graph.
        """
        if not pos_sets:
            raise ValueError("encode needs at least one position tensor")
        w = self.space.width
        for i, pos in enumerate(pos_sets):
            if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
                raise ValueError(f"pos_sets[{i}] has dtype {pos.dtype}; positions must be an integer tensor")
            if pos.ndim == 0 or pos.shape[-1] != w:
                raise ValueError(f"pos_sets[{i}] has shape {tuple(pos.shape)}; positions need a last dim of {w} coordinates")
        dev = self.place_ids.device
        flat = torch.cat([p.reshape(-1, w).to(dev, torch.int64) for p in pos_sets])  # (n, w)
        if torch.compiler.is_compiling():
            out = self.encode_unique(flat)
        elif self._serve_from_table():
            out = self._lookup(flat, self._check(flat))
        else:
            self._check(flat)
            uniq, inverse = self._unique(flat)
            out = self.encode_unique(uniq)[inverse]  # (n, d)
        sizes = [math.prod(p.shape[:-1]) for p in pos_sets]
        return [o.view(*p.shape[:-1], self.d_model) for o, p in zip(out.split(sizes), pos_sets)]

    def span(self, start: int, count: int) -> Float[Tensor, "count d"]:
        """Embeddings of the 1-D positions ``start … start + count - 1``. In inference this is a view of the
        table, not a gather (a decoding step reads its whole context's rows this way); otherwise ``self(pos)``."""
        if self.space.width != 1:
            raise ValueError(f"span(start, count) needs a 1-D space; this one has width {self.space.width}")
        if count < 1:
            raise ValueError(f"count = {count} is not allowed; it must be a positive integer")
        if self._serve_from_table():
            version = self._version()
            if not self._table_covers(start, count, version):  # check both ends, grow the table (all between too)
                self(torch.tensor([[start], [start + count - 1]], device=self.place_ids.device))
            if self._table_covers(start, count, version):
                assert self._table is not None
                return self._table.emb[start : start + count]
        return self(torch.arange(start, start + count, device=self.place_ids.device).view(-1, 1))  # or gathered

    def _table_covers(self, start: int, count: int, version: tuple[tuple[int, int], ...]) -> bool:
        """Whether the dense 1-D table of these parameters (``version``) holds rows ``start … start + count - 1``."""
        table = self._table
        return (
            table is not None and table.box is not None and 0 <= start and start + count <= table.box[0]
            and table.version == version
        )

    @torch.no_grad()
    def export_table(self, extent: Sequence[int] | int) -> Float[Tensor, "m d"]:
        """Embeddings of ``space.positions(extent)`` (row-major) as a plain tensor, in eval mode."""
        if not isinstance(self.space, GridSpace):
            raise ValueError(
                "export_table(extent) needs a grid space; for a hybrid space call the encoder in eval mode "
                "on explicit positions, e.g. encoder(space.layout('text:8, image:2x2').positions)"
            )
        was_training = self.training
        self.eval()
        try:
            return self(self.space.positions(extent).to(self.place_ids.device)).clone()
        finally:
            self.train(was_training)

    def train(self, mode: bool = True) -> "SeqPE":
        if mode:
            self._table, self._param_list = None, None  # training invalidates the inference table
        return super().train(mode)

    # -- dedup ----------------------------------------------------------------------------
    def _check(self, flat: Tensor) -> list[int]:
        """Largest value of each coordinate; the space's own check names a bad coordinate."""
        w = flat.shape[1]
        if flat.shape[0] == 0:
            return [-1] * w
        lo, hi = torch.aminmax(flat, dim=0)
        bounds = torch.cat([lo, hi]).tolist()  # one pass, one sync
        if min(bounds[:w]) < 0 or any(h >= r for h, r in zip(bounds[w:], self._radix)):
            self.space.check(flat)
        return bounds[w:]

    def _keys(self, flat: Tensor) -> Tensor:
        assert self._strides is not None
        if flat.shape[1] == 1:
            return flat[:, 0]
        return (flat * self.key_strides.to(flat.device)).sum(-1)

    def _unique(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Distinct rows of ``flat`` and the index of each row's copy among them."""
        if self._strides is None:  # keys would overflow int64: sort rows instead
            return torch.unique(flat, dim=0, return_inverse=True)
        keys, inverse = torch.unique(self._keys(flat), return_inverse=True)  # 1-D unique is much faster
        return self._from_keys(keys), inverse

    def _from_keys(self, keys: Tensor) -> Tensor:
        assert self._strides is not None
        return (keys[:, None] // self.key_strides.to(keys.device)) % self.key_radix.to(keys.device)

    # -- inference table ------------------------------------------------------------------
    def _serve_from_table(self) -> bool:
        if self.training or self._strides is None:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self._params()))

    def _params(self) -> list[nn.Parameter]:
        # Walking the module tree costs ~150 us per call; the list only changes in _apply (.to, .cuda).
        # A parameter replaced by assignment (enc.proj.weight = nn.Parameter(...)) needs enc.train() or .to().
        if self._param_list is None:
            self._param_list = list(self.parameters())
        return self._param_list

    def _apply(self, fn: Any, recurse: bool = True) -> "SeqPE":
        self._table, self._param_list = None, None
        return super()._apply(fn, recurse)

    def _version(self) -> tuple[tuple[int, int], ...]:
        # Any in-place update (optimizer.step, load_state_dict) bumps _version; .to() moves data_ptr.
        return tuple((p.data_ptr(), p._version) for p in self._params())

    @torch.no_grad()
    def _encode_chunked(self, pos: Tensor) -> Tensor:
        with torch.autocast(pos.device.type, enabled=False):  # the table keeps the parameters' precision
            return torch.cat([self.encode_unique(c) for c in pos.split(_TABLE_CHUNK)]) if len(pos) else self.encode_unique(pos)

    def _lookup(self, flat: Tensor, hi: list[int]) -> Tensor:
        version = self._version()
        table = self._table
        if table is not None and table.version != version:
            table = None  # parameters changed since the table was built: never serve it
        if flat.shape[0] == 0:
            return self.proj.weight.new_zeros(0, self.d_model)
        if table is None or table.box is not None:  # grid: dense while the box stays compact
            need = [h + 1 for h in hi]
            if table is not None and table.box is not None and all(n <= b for n, b in zip(need, table.box)):
                idx = flat[:, 0] if flat.shape[1] == 1 else (flat * table.box_strides).sum(-1)
                return F.embedding(idx, table.emb)  # the fast path: an APE-style gather
            if isinstance(self.space, GridSpace):
                box = need if table is None or table.box is None else [max(n, b) for n, b in zip(need, table.box)]
                if len(box) == 1 and table is not None:  # 1-D growth (decoding: one new position a step):
                    # a block at a time, so steps are gathers rather than a rebuild of the table each
                    limit = self.space.base ** self.space.digits
                    box = [min(limit, max(box[0], -(-box[0] // _GROW) * _GROW))]
                cached = 0 if table is None else len(table.emb)
                # A far request would fill a huge box (one corner of a 64x100x100 video is 640k
                # rows): stay dense only while the box is a few times what is actually asked for.
                if math.prod(box) <= 4 * (cached + len(flat)) + _TABLE_CHUNK:
                    self._table = self._extend_dense(table, box, version)
                    return self._lookup(flat, hi)
            table = self._to_sparse(table, version)
        self._table = self._extend_sparse(table, flat, version)
        return self._lookup_sparse(self._table, flat)

    def _extend_dense(self, old: _Table | None, box: list[int], version: tuple[tuple[int, int], ...]) -> _Table:
        """Grid spaces: the table covers the box ``[0, box)`` row-major; old rows are kept."""
        assert isinstance(self.space, GridSpace)
        dev = self.place_ids.device
        pos = self.space.positions(box).to(dev)  # (m, w) row-major
        emb = self.proj.weight.new_empty(pos.shape[0], self.d_model)
        todo = torch.ones(pos.shape[0], dtype=torch.bool, device=dev)
        if old is not None:
            assert old.box is not None and old.box_strides is not None
            todo = ~(pos < torch.tensor(old.box, device=dev)).all(-1)
            emb[~todo] = old.emb[(pos[~todo] * old.box_strides).sum(-1)]
        emb[todo] = self._encode_chunked(pos[todo])
        strides = torch.tensor(_strides(box), device=dev)
        return _Table(version=version, emb=emb, box=tuple(box), box_strides=strides)

    def _to_sparse(self, table: _Table | None, version: tuple[tuple[int, int], ...]) -> _Table:
        if table is None:
            return _Table(version=version, emb=self.proj.weight.new_zeros(0, self.d_model),
                          keys=torch.zeros(0, dtype=torch.int64, device=self.place_ids.device))
        assert isinstance(self.space, GridSpace) and table.box is not None
        # Row-major order over the box is also key order, so the keys come out sorted.
        keys = self._keys(self.space.positions(table.box).to(self.place_ids.device))
        return _Table(version=version, emb=table.emb, keys=keys)

    def _extend_sparse(self, table: _Table, flat: Tensor, version: tuple[tuple[int, int], ...]) -> _Table:
        """Sorted position keys (hybrid spaces, scattered grid requests); unseen keys are merged in."""
        assert table.keys is not None
        keys = self._keys(flat)
        at = torch.searchsorted(table.keys, keys).clamp(max=max(len(table.keys) - 1, 0))
        hit = table.keys[at] == keys if len(table.keys) else torch.zeros_like(keys, dtype=torch.bool)
        if bool(hit.all()):
            return table
        new = torch.unique(keys[~hit])
        merged = torch.cat([table.keys, new])
        order = merged.argsort()
        emb = torch.cat([table.emb, self._encode_chunked(self._from_keys(new))])[order]
        return _Table(version=version, emb=emb, keys=merged[order])

    def _lookup_sparse(self, table: _Table, flat: Tensor) -> Tensor:
        assert table.keys is not None
        return F.embedding(torch.searchsorted(table.keys, self._keys(flat)), table.emb)


def _masked_rows(weight: Tensor, ids: Tensor) -> Tensor:
    """``weight[ids]`` with zero rows where ``ids == NONE_ID``."""
    rows = F.embedding(ids.clamp(min=0), weight)
    return rows * (ids != NONE_ID).unsqueeze(-1).to(rows.dtype)


def _radix(space: Space) -> list[int]:
    """Exclusive upper bound of each coordinate of a position that ``space.check`` accepts."""
    digits, max_hi = space.box_digits, space.box_max_hi  # (g, w) per group
    return [
        max(space.base ** int(k) if k > 0 else int(hi) for k, hi in zip(digits[:, i], max_hi[:, i]))
        for i in range(space.width)
    ]


def _strides(radix: Sequence[int]) -> list[int]:
    """Row-major strides of a box with extents ``radix``."""
    out = [1] * len(radix)
    for i in reversed(range(len(radix) - 1)):
        out[i] = out[i + 1] * int(radix[i + 1])
    return out


# -- checkpoints: safetensors weights + JSON config, never pickle ---------------------------
WEIGHTS, CONFIG = "encoder.safetensors", "encoder.json"


def save_encoder(encoder: SeqPE, path: str | Path) -> Path:
    """Write ``path/encoder.safetensors`` and ``path/encoder.json`` (constructor args + space)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    config = {"seqpe": encoder.config, "space": encoder.space.model_dump(mode="json")}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_encoder(path: str | Path, *, map_location: str | torch.device = "cpu") -> SeqPE:
    """Rebuild an encoder saved by :func:`save_encoder`."""
    src = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (src / name).is_file():
            raise FileNotFoundError(f"encoder checkpoint {str(src)!r} has no {name}; expected a folder written by save_encoder")
    config = json.loads((src / CONFIG).read_text())
    missing = {"seqpe", "space"} - set(config)
    if missing:
        raise ValueError(f"{src / CONFIG} lacks the field(s) {sorted(missing)}; expected 'seqpe' and 'space'")
    kwargs = dict(config["seqpe"])
    encoder = SeqPE(load_space(config["space"]), kwargs.pop("d_model"), **kwargs)
    encoder.load_state_dict(load_file(str(src / WEIGHTS), device=str(map_location)))
    return encoder.to(map_location)
