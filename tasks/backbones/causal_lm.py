"""Any position encoding in a Hugging Face causal LM, through transformers' attention-function seam.

Nothing of a modeling file is copied. The stock model runs unchanged except at its position
seams: its own rotary (Llama, Qwen2, Mistral: ``model.rotary_emb``) or learned lookup (GPT-2:
``wpe``) gives way to nothing, and the attention function is ours, registered with transformers
under :data:`ATTN_IMPLEMENTATION` together with a mask function: it hands q, k, v of each layer to
``pe.attend`` with the explicit query/key positions of this forward and the key padding mask.

:class:`PositionEncodingLM` is the forward every adapted model shares: ``PositionEncoding.prepare``
once per forward, its state reaching every layer as a keyword argument transformers threads
through to the attention function, ``pe.embed`` added to the token embeddings, the PE's auxiliary
loss in the output. Positions are never inferred from an index or a cache length: the positions
of cached keys are recorded on the cache object itself, so incremental decoding, shifted starts
and left-padded batches see exactly the positions of the full forward; the keys a PE transforms
are kept transformed beside the cache, so a decoding step does PE work only for its new tokens.

A PE model saves and loads the Hugging Face way: its config is the stock config under a model type of
its own (``seqpe_nd_<stock type>``, :func:`pe_config_class`) recording the PE's config and space
under :data:`PE_CONFIG_KEY`; registered with ``AutoConfig`` and ``AutoModelForCausalLM`` (importing
:mod:`seqpe_nd.tasks.backbones.huggingface` does it), ``from_pretrained`` builds the model, rebuilds
its PE from that record and loads both. The PE's non-persistent buffers (RoPE frequencies, ALiBi
slopes, SeqPE's digit tables), which transformers' loader leaves uninitialised, are recomputed in
``_init_weights``, where it refills its own rotary buffers.

:mod:`seqpe_nd.tasks.backbones.gpt2` is GPT-2 (``GPT2WithPE``); :mod:`seqpe_nd.tasks.backbones.huggingface`
has ``attach_position_encoding`` (a GPT-2 or Llama-family instance) and registers every family on import.

Tested against transformers 5.24 (pinned ``>=5.24,<5.25`` in pyproject: the attention interface
and mask interface change between minors).

Legend: b batch, n query tokens, m key tokens, h heads, e head dim, d model dim, w coordinates
per position (1 for text), v vocabulary.
"""

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from seqpe_nd.encodings import PESpec, build_position_encoding
from seqpe_nd.encodings.base import KVCache, PEDraws, PEState, PositionEncoding, host_readable
from seqpe_nd.tasks.backbones.pe_logs import add_pe_logs

ATTN_IMPLEMENTATION = "seqpe_nd"
"""Name under which the attention and mask functions are registered with transformers."""

PE_CONFIG_KEY = "position_encoding"
"""The entry of a PE model's config (and its ``config.json``) that records the PE: ``PESpec.model_dump(mode="json")``,
i.e. ``{"config": <the PE config>, "space": <the position space>}``."""

_KEY_POSITIONS = "_seqpe_nd_key_positions"  # attribute on a Cache: positions of its keys, (b, m, w)
_TRANSFORMED_KEYS = "_seqpe_nd_transformed_keys"  # attribute on a Cache: a TransformedKeys


class TransformedKeys(KVCache):
    """Each layer's keys after the PE's ``transform_qk``, kept beside a Hugging Face cache.

    The HF cache stores raw keys and values; without this every decoding step would transform
    every cached key again, so the PE work per generated token would grow with the context. A
    step transforms only its new keys and appends them here; values stay in the HF cache. When the
    two disagree in length (the HF cache was cropped or reordered), the layer starts afresh from
    the HF cache's raw keys, so decoding always equals the full forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.values_in_use: Tensor | None = None  # this layer's full values, from the HF cache
        self.last_raw: dict[int, Tensor] = {}  # each layer's newest raw key when it was last transformed
        self.buffers: dict[int, Tensor] = {}  # room to append without copying every key each step

    def continues(self, layer: int, raw_keys: Tensor, n: int) -> bool:
        """Whether the kept keys are the first ``m - n`` of ``raw_keys`` (``n`` of them new).

        The length must match, and (checked on the first layer only: one sync a step) the newest
        kept raw key must be where it was: a cropped or reordered HF cache fails this, and that
        layer is transformed afresh.
        """
        kept = self.keys.get(layer)
        if kept is None or kept.shape[-2] + n != raw_keys.shape[-2]:
            return False
        if layer == min(self.keys):
            end = raw_keys.shape[-2] - n
            if not torch.equal(self.last_raw[layer], raw_keys[:, :, end - 1 : end]):
                self.keys.clear()  # every layer was cropped or reordered alike: all start afresh
                self.buffers.clear()
                return False
        return True

    def begin(self, layer: int, raw_keys: Tensor, values: Tensor, n: int) -> slice:
        """Get ``layer`` ready for a step with ``n`` new of ``raw_keys``: which raw keys still need transforming
        (the new ones, or all when the layer starts afresh); the values stay the HF cache's."""
        if not self.continues(layer, raw_keys, n):  # fresh, or the HF cache was cropped or reordered
            self.keys.pop(layer, None)
            self.buffers.pop(layer, None)
        self.values_in_use = values
        self.last_raw[layer] = raw_keys[:, :, -1:]
        m = raw_keys.shape[-2]
        return slice(m - n, m) if layer in self.keys else slice(0, m)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k`` in a buffer that doubles when full (amortised O(1) a step, not a copy of every key)."""
        assert self.values_in_use is not None, "call begin() first"
        buf, old = self.buffers.get(layer), self.keys.get(layer)
        if old is None:  # the prompt: kept as it is (contiguous, as the fused prefill kernels want it)
            self.keys[layer] = k
        else:
            m = old.shape[-2]
            if buf is None or buf.shape[-2] < m + k.shape[-2] or buf.shape[:2] != k.shape[:2]:
                grown = k.new_empty(*k.shape[:2], max(2 * (m + k.shape[-2]), 64), k.shape[-1])
                grown[:, :, :m] = old
                buf = self.buffers[layer] = grown
            buf[:, :, m : m + k.shape[-2]] = k
            self.keys[layer] = buf[:, :, : m + k.shape[-2]]
        return self.keys[layer], self.values_in_use


@dataclass(frozen=True)
class PEForward:
    """What one model forward hands to every layer's attention: the PE, its prepared state, and the
    store of transformed keys when a cache is in use."""

    pe: PositionEncoding
    state: PEState
    keys: TransformedKeys | None = None


def _attention(
    module: nn.Module,
    query: Float[Tensor, "b h n e"],
    key: Float[Tensor, "b hk m e"],
    value: Float[Tensor, "b hk m e"],
    attention_mask: Bool[Tensor, "b m"] | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    seqpe_nd: PEForward | None = None,
    **_: Any,
) -> tuple[Float[Tensor, "b n h e"], None]:
    """The registered attention function: ``pe.attend`` on this layer with explicit positions."""
    if seqpe_nd is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} needs the PE state of the forward; "
            "call the PE model's forward (or generate), not the inner transformer directly"
        )
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves a group of queries
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    store, layer = seqpe_nd.keys, module.layer_idx
    # With a cache, only this step's keys are transformed; the earlier ones are kept transformed in the store.
    new = slice(None) if store is None else store.begin(layer, key, value, query.shape[-2])
    out = seqpe_nd.pe.attend(
        query, key[:, :, new], value[:, :, new], seqpe_nd.state, layer,
        causal=True, key_padding_mask=attention_mask, dropout_p=dropout, scale=scaling, cache=store,
    )  # (b, h, n, e); queries are the last n of the m keys
    return out.transpose(1, 2), None  # (b, n, h, e)


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **_: Any,
) -> Bool[Tensor, "b m"] | None:
    """The registered mask function: a key padding mask (True = attend), or None when nothing is padded.

    Causality is not expressed here: ``pe.attend`` applies it (queries are the last n of m keys).
    """
    if attention_mask is None:
        return None
    mask = prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)[:, kv_offset : kv_offset + kv_length]
    return None if bool(mask.all()) else mask


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)


@dataclass
class CausalLMOutputWithPE(CausalLMOutputWithCrossAttentions):
    """GPT-2's output plus the PE's auxiliary loss of this forward (SeqPE regularizers in training). With labels in
    training, ``loss`` is the loss to optimize, ``lm_loss + pe_aux_loss`` (as Mixtral adds its router loss)."""

    lm_loss: torch.Tensor | None = None  # the language-model loss alone (with labels)
    pe_aux_loss: torch.Tensor | None = None
    pe_logs: dict[str, Any] | None = None
    """The PE's training logs of this forward (SeqPE: ``loss_delta``, ``loss_ood``, ``loss_reg``, ``pe_spread``,
    ``pe_cos``)."""


class PositionSeam(Protocol):
    """Where a model family keeps its own positions, and its sizes: what the PE replaces and is sized by."""

    def check(self, config: PreTrainedConfig) -> None:
        """Refuse stock options whose behaviour the PE's attention would silently drop."""

    def sizes(self, config: PreTrainedConfig) -> dict[str, int]:
        """The model's ``num_heads``, ``head_dim``, ``num_layers`` and ``d_model`` (``build_position_encoding``'s)."""

    def remove(self, model: nn.Module) -> None:
        """Replace the model's own position seam (rotary, learned lookup) by a stand-in that adds nothing."""


class PositionEncodingLM:
    """The forward of a causal LM whose positions come from ``self.pe`` (mixed into a transformers model class).

    ``forward`` takes the stock arguments; ``position_ids`` may be ``(b, n)`` or explicit
    ``(b, n, w)`` coordinates. Without them, positions continue after the cached keys, or count
    the real tokens of ``attention_mask`` (left padding), or start at 0. ``pe_shifted`` tells the
    PE that this training step uses shifted positions (the OOD loss is then skipped);
    ``pe_generator`` drives the PE's regularizer sampling, or ``pe_draws`` (``pe.draw(generator)``) gives it.
    """

    pe: PositionEncoding
    config_class: ClassVar[type[PreTrainedConfig]]  # the stock config class under a model type of its own
    seam: ClassVar[PositionSeam]  # the family's own positions (GPT-2: wpe; Llama family: rotary)

    # -- building, saving, loading --------------------------------------------------------
    def __init__(self, config: PreTrainedConfig, pe: PositionEncoding | None = None) -> None:
        """The stock model (stock init) with ``pe``; without ``pe``, the PE that ``config`` records (how loading
        rebuilds it); with both, ``pe`` must be the recorded one. A config that records no PE is copied, not changed."""
        if pe is not None and getattr(config, PE_CONFIG_KEY, None) is None:  # the caller's may build other models
            config = copy.deepcopy(config)
        self.seam.check(config)
        config._attn_implementation = ATTN_IMPLEMENTATION
        super().__init__(config)  # type: ignore[call-arg]
        self.install_position_encoding(self.pe_from_config(config) if pe is None else pe)

    @classmethod
    def pe_from_config(cls, config: PreTrainedConfig) -> PositionEncoding:
        """The PE that ``config`` records under :data:`PE_CONFIG_KEY`, built for this model's sizes."""
        record = getattr(config, PE_CONFIG_KEY, None)
        if record is None:
            raise ValueError(
                f"the config records no position encoding ({PE_CONFIG_KEY!r}); pass pe=, built by "
                "build_position_encoding, or load a stock checkpoint with its stock class and attach_position_encoding"
            )
        spec = PESpec.model_validate(record)
        return build_position_encoding(spec.config, space=spec.space, **cls.seam.sizes(config))

    @classmethod
    def pe_record(cls, config: PreTrainedConfig, pe: PositionEncoding) -> dict[str, Any] | None:
        """What ``config`` will record for ``pe``, once ``pe`` is checked against the model and any record there."""
        sizes = cls.seam.sizes(config)
        pe.check_fits(num_layers=sizes["num_layers"], num_heads=sizes["num_heads"], head_dim=sizes["head_dim"])
        if not issubclass(cls.config_class, type(config)):
            stock = cls.config_class.__mro__[1].__name__
            raise ValueError(f"{cls.__name__} takes a {stock}, got {type(config).__name__}")
        saved = getattr(config, PE_CONFIG_KEY, None)
        if pe.spec is None:
            return saved
        record = pe.spec.model_dump(mode="json")
        if saved is not None and saved != record:
            raise ValueError(f"the PE differs from the one the config records: {_first_difference(saved, record)}")
        return record

    def install_position_encoding(self, pe: PositionEncoding) -> None:
        """Put ``pe`` in place of the model's own positions; the config (now the PE model's config class) records it."""
        config: Any = self.config  # type: ignore[attr-defined]
        record = self.pe_record(config, pe)
        config.__class__ = self.config_class  # the same fields under the PE model's own model_type
        setattr(config, PE_CONFIG_KEY, record)
        config._attn_implementation = ATTN_IMPLEMENTATION  # every layer reads the shared config
        self.loss_type = "ForCausalLM"  # transformers guesses it from the class name (GPT2WithPE: none, a warning)
        self.seam.remove(self)  # type: ignore[arg-type]
        self.pe = pe.train(self.training)  # type: ignore[attr-defined]  # the model's mode (eval after from_pretrained)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' loader replaces every non-persistent buffer by uninitialised memory and refills it here
        # (as it refills its own rotary inv_freq): the PE's buffers are derived from its arguments, recompute them.
        super()._init_weights(module)  # type: ignore[misc]
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``; the config it writes records the PE (refused for a PE built by hand)."""
        if getattr(self.config, PE_CONFIG_KEY, None) is None:  # type: ignore[attr-defined]
            raise ValueError(
                f"{type(self.pe).__name__} was constructed directly, so its config and space are unknown and "
                "from_pretrained could not rebuild it; build it with build_position_encoding to save it this way"
            )
        return super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]

    # -- positions ------------------------------------------------------------------------
    @staticmethod
    def _past_positions(cache: Cache | None, batch: int) -> Int[Tensor, "b p w"] | None:
        """Positions of the keys already in ``cache``, as recorded when they were added."""
        if cache is None:
            return None
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"a PE model supports DynamicCache only, got {type(cache).__name__}")
        seen = cache.get_seq_length()
        if seen == 0:
            return None
        past = getattr(cache, _KEY_POSITIONS, None)
        if past is None or past.shape[1] < seen:
            have = 0 if past is None else past.shape[1]
            raise ValueError(
                f"the cache holds {seen} keys but positions were recorded for {have}; "
                "fill caches through the PE model's forward so that key positions are tracked"
            )
        if past.shape[0] != batch:
            raise ValueError(f"the cache was filled for batch {past.shape[0]} but the input has batch {batch}")
        return past[:, :seen]  # a cropped cache (assisted decoding) keeps its first `seen` keys

    @staticmethod
    def _query_positions(
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
        past: Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
    ) -> Int[Tensor, "b n w"]:
        if position_ids is not None:
            if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
                raise ValueError(f"position_ids must hold integer positions, got dtype {position_ids.dtype}")
            pos = position_ids if position_ids.ndim == 3 else position_ids.unsqueeze(-1)
            if pos.ndim != 3 or pos.shape[1] != length or pos.shape[0] not in (1, batch):
                raise ValueError(
                    f"position_ids of shape {tuple(position_ids.shape)} do not match the input "
                    f"(batch {batch}, {length} tokens); expected (b, n) or (b, n, w)"
                )
            return pos.long().expand(batch, -1, -1)
        steps = torch.arange(length, device=device)
        if past is not None:  # continue each row after its last cached key
            if past.shape[-1] != 1:
                raise ValueError("positions with several coordinates must be passed explicitly as position_ids (b, n, w)")
            return past[:, -1:, :] + 1 + steps.view(1, length, 1)
        if attention_mask is not None and attention_mask.ndim == 2:  # left padding: count real tokens
            real = attention_mask.long()
            return (real.cumsum(-1) - 1).clamp(min=0)[:, -length:].unsqueeze(-1)
        return steps.view(1, length, 1).expand(batch, -1, -1)

    def _transformed_keys(self, cache: Cache | None, past: Tensor | None) -> TransformedKeys | None:
        """The cache's store of transformed keys (new with a fresh cache); None without a cache, or when the
        PE leaves keys as they are (then the HF cache's own keys serve)."""
        if cache is None or not self.pe.transforms_keys:
            return None
        store = getattr(cache, _TRANSFORMED_KEYS, None)
        if store is None or past is None:
            store = TransformedKeys()
            setattr(cache, _TRANSFORMED_KEYS, store)
        return store

    # -- forward --------------------------------------------------------------------------
    def forward(  # type: ignore[override]
        self,
        input_ids: Int[Tensor, "b n"] | None = None,
        cache: Cache | None = None,
        attention_mask: Int[Tensor, "b m"] | Bool[Tensor, "b m"] | None = None,
        position_ids: Int[Tensor, "#b n"] | Int[Tensor, "#b n w"] | None = None,
        inputs_embeds: Float[Tensor, "b n d"] | None = None,
        labels: Int[Tensor, "b n"] | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        *,
        pe_generator: torch.Generator | None = None,
        pe_shifted: bool = False,
        pe_draws: PEDraws | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPE:
        if "past_key_values" in kwargs:  # the pre-5.40 spelling of `cache`
            cache = kwargs.pop("past_key_values")
        if kwargs.get("return_dict") is False:
            raise ValueError(f"{type(self).__name__} always returns a CausalLMOutputWithPE; return_dict=False is not supported")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            table = self.get_input_embeddings()  # type: ignore[attr-defined]
            vocab = table.num_embeddings
            if host_readable(input_ids) and input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
                bad = int(input_ids.min()) if int(input_ids.min()) < 0 else int(input_ids.max())
                raise ValueError(f"input_ids holds token {bad}, outside the vocabulary 0..{vocab - 1}")
            inputs_embeds = table(input_ids)
        batch, length = inputs_embeds.shape[:2]

        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not (self.is_activation_checkpointing and self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        past = self._past_positions(cache, batch)
        pos_q = self._query_positions(position_ids, attention_mask, past, batch, length, inputs_embeds.device)
        pos_k = pos_q if past is None else torch.cat([past, pos_q], dim=1)
        state = self.pe.prepare(pos_q, None if past is None else pos_k, generator=pe_generator, shifted=pe_shifted,
                                draws=pe_draws)
        added = self.pe.embed(state)
        if added is not None:  # APE / SeqPE input_add replace the wpe lookup
            inputs_embeds = inputs_embeds + added.to(inputs_embeds.dtype)

        out = super().forward(  # type: ignore[misc]
            inputs_embeds=inputs_embeds,
            cache=cache,
            attention_mask=attention_mask,
            position_ids=pos_q[..., 0] if pos_q.shape[-1] == 1 else None,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            seqpe_nd=PEForward(self.pe, state, self._transformed_keys(cache, past)),
            **kwargs,
        )
        if cache is not None:
            setattr(cache, _KEY_POSITIONS, pos_k.detach())
        fields, aux, logs = dict(out.items()), getattr(state, "aux_loss", None), getattr(state, "logs", None)
        if out.loss is not None and aux is not None:  # labels in training: any trainer optimizing `loss` gets L_δ, L_OOD
            fields["loss"] = out.loss + aux
            add_pe_logs(self, logs)
        return CausalLMOutputWithPE(**fields, lm_loss=out.loss, pe_aux_loss=aux, pe_logs=logs)


def _first_difference(saved: Any, given: Any, path: str = "") -> str:
    """The first field where two records differ, as ``path: saved != given``."""
    if isinstance(saved, dict) and isinstance(given, dict):
        for key in sorted(set(saved) | set(given), key=str):
            if saved.get(key) != given.get(key):
                return _first_difference(saved.get(key), given.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'record'}: recorded {saved!r}, given {given!r}"


def pe_config_class(base: type[PreTrainedConfig], module: str) -> type[PreTrainedConfig]:
    """``base`` (a stock config class) under the model type ``seqpe_nd_<base.model_type>``: what a PE model saves, so
    that its directory does not load as the stock model without a word (``module``: where the class is bound)."""
    return type(f"{base.__name__}WithPE", (base,), {
        "model_type": f"seqpe_nd_{base.model_type}", "__module__": module,
        "__doc__": f"{base.__name__} of a causal LM with a position encoding, recorded under {PE_CONFIG_KEY!r}.",
    })


def __getattr__(name: str) -> Any:
    # attach_position_encoding and NoRotary lived here; they moved to the huggingface module (which imports this one).
    if name in ("attach_position_encoding", "NoRotary"):
        from seqpe_nd.tasks.backbones import huggingface

        return getattr(huggingface, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
