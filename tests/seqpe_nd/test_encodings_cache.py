"""For every method: cached decoding equals the full forward, a padded batch equals its rows.

A two-layer toy backbone drives the interface exactly as an adapter would: prepare once,
embed once, attend per layer, never asking which method it holds.
"""

import pytest
import torch
from torch import Tensor, nn

from seqpe_nd.encodings import METHODS, KVCache, PositionEncoding, build_position_encoding, load_pe_config
from seqpe_nd.positions import load_space

H, E, LAYERS = 2, 12, 2
D = H * E


class Toy(nn.Module):
    def __init__(self, pe: PositionEncoding) -> None:
        super().__init__()
        self.pe = pe
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(LAYERS))
        self.out = nn.ModuleList(nn.Linear(D, D) for _ in range(LAYERS))

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        *,
        causal: bool = True,
        key_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        raw: dict | None = None,
    ) -> Tensor:
        """``cache``: transformed keys cached by KVCache; ``raw``: raw k/v cached by the caller
        (as Hugging Face does), all keys re-passed to attend with their positions."""
        pos_k, mask = pos, key_padding_mask
        if cache is not None:
            pos_k, mask = cache.extend(pos, key_padding_mask)
        if raw is not None:
            pos_k = raw["pos"] = pos if "pos" not in raw else torch.cat([raw["pos"], pos], dim=1)
        state = self.pe.prepare(pos, None if pos_k is pos else pos_k)
        emb = self.pe.embed(state)
        x = x if emb is None else x + emb
        b, n, _ = x.shape
        for layer in range(LAYERS):
            q, k, v = (t.view(b, n, H, E).transpose(1, 2) for t in self.qkv[layer](x).chunk(3, dim=-1))  # (b, h, n, e)
            if raw is not None and layer in raw:
                k, v = torch.cat([raw[layer][0], k], 2), torch.cat([raw[layer][1], v], 2)
            if raw is not None:
                raw[layer] = (k, v)
            o = self.pe.attend(q, k, v, state, layer, causal=causal, key_padding_mask=mask, cache=cache)
            x = x + self.out[layer](o.transpose(1, 2).reshape(b, n, D))
        return x


def space(extent: list[int]):
    return load_space({"L": extent, "L_max": [e * 8 for e in extent]})


def toy(method: str, extent: list[int]) -> Toy:
    torch.manual_seed(0)
    cfg: dict = {"method": method}
    if method == "seqpe":
        cfg.update(hidden=16, layers=1, heads=2, dropout=0.0, integration="attn_bias", per_layer=True)
    pe = build_position_encoding(cfg, space=space(extent), num_heads=H, head_dim=E, num_layers=LAYERS, d_model=D)
    model = Toy(pe).eval()
    if method == "rope_mixed" or method == "seqpe":  # make layers differ visibly
        for p in pe.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["kv_cache", "raw_keys"])
def test_cached_decoding_equals_the_full_forward(method: str, mode: str) -> None:
    model = toy(method, [16])
    n, start = 12, 3  # a shifted start: positions are explicit
    x = torch.randn(2, n, D)
    pos = (torch.arange(n) + start).expand(2, n)[..., None]
    with torch.no_grad():
        full = model(x, pos)
        cache, raw = (KVCache(), None) if mode == "kv_cache" else (None, {})
        steps = [model(x[:, :5], pos[:, :5], cache=cache, raw=raw)]  # prefill
        for t in range(5, n):
            steps.append(model(x[:, t : t + 1], pos[:, t : t + 1], cache=cache, raw=raw))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def padded_batch(rows: list[tuple[Tensor, Tensor]], side: str) -> tuple[Tensor, Tensor, Tensor]:
    """Stack (x, pos) rows padded to the longest; pads carry position 0 and zero features."""
    n = max(r[0].shape[0] for r in rows)
    xs, ps, ms = [], [], []
    for x, p in rows:
        pad = n - x.shape[0]
        zx, zp, ones = (
            torch.zeros(pad, D),
            torch.zeros(pad, p.shape[1], dtype=torch.long),
            torch.ones(x.shape[0], dtype=torch.bool),
        )
        cat = (lambda a, b: torch.cat([a, b])) if side == "right" else (lambda a, b: torch.cat([b, a]))
        xs.append(cat(x, zx))
        ps.append(cat(p, zp))
        ms.append(cat(ones, torch.zeros(pad, dtype=torch.bool)))
    return torch.stack(xs), torch.stack(ps), torch.stack(ms)


def exists(method: str, ndim: int) -> bool:
    """The method is defined on an ``ndim``-D grid (its config's own rule)."""
    return load_pe_config({"method": method}).unsupported(space([4] * ndim)) is None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_causal_batch_equals_unpadded_rows_1d(method: str, side: str) -> None:
    model = toy(method, [16])
    torch.manual_seed(1)
    rows = [(torch.randn(n, D), (torch.arange(n) + s)[:, None]) for n, s in ((10, 0), (6, 4))]
    x, pos, mask = padded_batch(rows, side)
    with torch.no_grad():
        got = model(x, pos, key_padding_mask=mask)
        for i, (rx, rp) in enumerate(rows):
            torch.testing.assert_close(got[i][mask[i]], model(rx[None], rp[None])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if exists(m, 2)])
@pytest.mark.parametrize("extent", [[3, 4], [2, 2, 3]])
def test_padded_bidirectional_batch_equals_unpadded_rows_nd(method: str, extent: list[int]) -> None:
    model = toy(method, extent)
    torch.manual_seed(1)
    sp = space(extent)
    small = [max(1, e - 1) for e in extent]
    rows = [(torch.randn(len(p), D), p) for p in (sp.positions(extent), sp.positions(small, start=[1] * len(extent)))]
    x, pos, mask = padded_batch(rows, "right")
    with torch.no_grad():
        got = model(x, pos, causal=False, key_padding_mask=mask)
        for i, (rx, rp) in enumerate(rows):
            torch.testing.assert_close(
                got[i][mask[i]], model(rx[None], rp[None], causal=False)[0], rtol=1e-5, atol=1e-5
            )


def test_attend_says_when_keys_and_positions_disagree() -> None:
    model = toy("rope", [16])
    pe = model.pe
    state = pe.prepare(torch.arange(3)[None, :, None], torch.arange(8)[None, :, None])
    q = torch.randn(1, H, 3, E)
    with pytest.raises(ValueError, match="pass the cache or all keys"):
        pe.attend(q, q, q, state, 0, causal=True)


HYBRID = {
    "kind": "hybrid",
    "modalities": [
        {"name": "text", "space": {"L": 16, "L_max": 300}},
        {"name": "image", "space": {"L": [3, 3], "L_max": [20, 20]}},
    ],
}


@pytest.mark.parametrize("method", ["nope", "alibi_nd", "seqpe"])
def test_cached_decoding_on_an_interleaved_hybrid_sequence(method: str) -> None:
    torch.manual_seed(0)
    sp = load_space(HYBRID)
    cfg: dict = {"method": method}
    if method == "seqpe":
        cfg.update(hidden=16, layers=1, heads=2, dropout=0.0, integration="attn_sum")
    model = Toy(build_position_encoding(cfg, space=sp, num_heads=H, head_dim=E, num_layers=LAYERS, d_model=D)).eval()
    pos = sp.layout("text:3, image:2x2, text:3").positions[None]  # (1, 10, 4)
    x = torch.randn(1, pos.shape[1], D)
    with torch.no_grad():
        full = model(x, pos)
        cache = KVCache()
        steps = [model(x[:, t : t + 1], pos[:, t : t + 1], cache=cache) for t in range(pos.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
