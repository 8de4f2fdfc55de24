"""Backbones: the padding guarantees each one documents, causality, the LRU scan."""

import pytest
import torch

from model.backbones import BACKBONES, LowRankAttention, SpatialGatingUnit, lru_recurrence, lru_scan

D, MAX_LEN = 16, 8


def make(name, seed=0):
    torch.manual_seed(seed)
    return BACKBONES[name](hidden_size=D, num_layers=2, num_heads=2, dropout=0.3, max_len=MAX_LEN).eval()


def left_padded(n_real, L, seed=1):
    """(1, L, D) random input whose first L - n_real positions are padding, and its mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, L, D, generator=g)
    mask = torch.arange(L) >= L - n_real
    return x, mask.unsqueeze(0)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_output_shape_no_nan_and_zero_at_padding(name):
    x = torch.randn(3, MAX_LEN, D)
    mask = torch.tensor([[False] * 8, [False] * 5 + [True] * 3, [True] * 8])  # incl. an all-padding row
    y = make(name)(x, mask)
    assert y.shape == (3, MAX_LEN, D)
    assert torch.isfinite(y).all()
    assert (y[~mask] == 0).all()
    assert (y[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_padding_content_does_not_matter(name):
    model = make(name)
    x, mask = left_padded(5, MAX_LEN)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), D) * 10
    torch.testing.assert_close(model(x, mask), model(x2, mask))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_extra_left_padding_does_not_matter(name):
    model = make(name)
    x, mask = left_padded(4, MAX_LEN)
    short = model(x[:, -5:], mask[:, -5:])  # one padded slot instead of four
    full = model(x, mask)
    torch.testing.assert_close(short[:, -4:], full[:, -4:], atol=1e-5, rtol=1e-5)


CAUSAL = sorted(set(BACKBONES) - {"fmlprec"})


@pytest.mark.parametrize("name", CAUSAL)
def test_causal(name):
    model = make(name)
    x, mask = left_padded(6, MAX_LEN)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, D)
    y, y2 = model(x, mask), model(x2, mask)
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_fmlprec_is_not_causal():
    """Documented limitation: the FFT filter lets later inputs change earlier outputs."""
    model = make("fmlprec")
    x, mask = left_padded(6, MAX_LEN)
    x2 = x.clone()
    x2[:, -1] = torch.randn(D)
    assert not torch.allclose(model(x, mask)[:, 2:-1], model(x2, mask)[:, 2:-1])


def test_sequence_longer_than_max_len_is_rejected():
    x, mask = torch.randn(1, MAX_LEN + 1, D), torch.ones(1, MAX_LEN + 1, dtype=torch.bool)
    for name in BACKBONES:
        with pytest.raises((ValueError, RuntimeError, IndexError)):
            make(name)(x, mask)


@pytest.mark.parametrize("L", [1, 2, 5, 8, 13])
def test_lru_scan_equals_recurrence(L):
    g = torch.Generator().manual_seed(L)
    n = 6
    lam = torch.polar(0.5 + 0.5 * torch.rand(n, generator=g), 6.28 * torch.rand(n, generator=g))
    b = torch.complex(torch.randn(3, L, n, generator=g), torch.randn(3, L, n, generator=g))
    # an explicit loop with Python complex numbers, independent of both functions
    expected = torch.zeros(3, L, n, dtype=torch.complex64)
    for i in range(3):
        for j in range(n):
            h = 0j
            for t in range(L):
                h = complex(lam[j]) * h + complex(b[i, t, j])
                expected[i, t, j] = h
    torch.testing.assert_close(lru_recurrence(lam, b), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lru_scan(lam, b), expected, atol=1e-5, rtol=1e-5)


def test_lru_eigenvalues_start_on_the_ring():
    layer = make("lrurec").blocks[0].lru
    radius = torch.exp(-torch.exp(layer.nu_log))
    assert ((radius >= 0.8 - 1e-6) & (radius <= 0.99 + 1e-6)).all()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_gradients_reach_every_parameter(name):
    model = make(name).train()
    x = torch.randn(4, MAX_LEN, D, requires_grad=True)
    mask = torch.arange(MAX_LEN).expand(4, -1) >= torch.tensor([[0], [2], [5], [7]])
    model(x, mask).pow(2).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_sasrec_rows_are_independent_of_their_batch_and_its_attention_windows():
    """SASRec packs real positions and attends in windows of rows of similar length: each row
    must come out as it does alone and unpadded, whatever the windows."""
    model = make("sasrec")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, MAX_LEN, D, generator=g)
    lengths = torch.tensor([8, 1, 5, 0, 3, 8, 2])
    mask = torch.arange(MAX_LEN) >= MAX_LEN - lengths[:, None]
    together = model(x, mask)  # one window: rows_per_window > 7
    model.rows_per_window = 2
    windowed = model(x, mask)
    torch.testing.assert_close(windowed, together)
    for i, n in enumerate(lengths.tolist()):
        if n:
            alone = model(x[i:i + 1, MAX_LEN - n:], torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(windowed[i:i + 1, MAX_LEN - n:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows_per_window", [2, 32])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_last_only_equals_the_last_position_of_the_full_output(name, rows_per_window):
    model = make(name)
    model.rows_per_window = rows_per_window  # SASRec's windows; ignored by the others
    x = torch.randn(7, MAX_LEN, D, generator=torch.Generator().manual_seed(4))
    mask = torch.arange(MAX_LEN) >= MAX_LEN - torch.tensor([8, 1, 5, 0, 3, 8, 2])[:, None]  # incl. an empty row
    last = model(x, mask, last_only=True)
    assert last.shape == (7, D)
    torch.testing.assert_close(last, model(x, mask)[:, -1])


def next_item_task():
    """Four sequences of 8 items over 29; "2", "4", "16" and "18" each appear in two
    sequences followed by different items, so predicting after them needs the history."""
    seqs = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8],
                         [9, 2, 10, 4, 11, 12, 13, 14],
                         [15, 16, 17, 18, 19, 20, 21, 22],
                         [23, 16, 24, 18, 25, 26, 27, 28]])
    inputs = torch.cat([torch.zeros(4, 1, dtype=torch.long), seqs[:, :-1]], dim=1)  # one padded slot
    return inputs, seqs[:, 1:], 29


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_overfits_a_tiny_next_item_task(name):
    """Item table + backbone, softmax over every item at every position: after training,
    every next item of the training set ranks first, including the history-dependent ones."""
    torch.manual_seed(0)
    inputs, targets, n_items = next_item_task()
    items = torch.nn.Embedding(n_items, D)
    model = BACKBONES[name](hidden_size=D, num_layers=2, num_heads=2, dropout=0.0, max_len=MAX_LEN)
    optimizer = torch.optim.Adam([*items.parameters(), *model.parameters()], lr=1e-2)
    mask = inputs != 0
    for step in range(300):
        logits = model(items(inputs), mask)[:, 1:] @ items.weight.T  # (4, 7, n_items)
        if (logits.argmax(-1) == targets).all():
            break
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n_items), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (logits.argmax(-1) == targets).all(), f"not fitted after {step + 1} steps, loss {loss.item():.3f}"


def test_narm_local_encoder_by_hand():
    """c_t = B [sum_{j<=t} v^T sigmoid(A1 h_j + A2 h_t) h_j ; h_t] (eqs. 5-8), position by position."""
    model = make("narm")
    x, mask = left_padded(5, MAX_LEN, seed=6)
    h, _ = model.gru(model.input(x, mask))
    expected = torch.zeros(MAX_LEN, D)
    for t in range(MAX_LEN - 5, MAX_LEN):
        c_local = sum(model.v(torch.sigmoid(model.A1(h[0, j]) + model.A2(h[0, t]))) * h[0, j]
                      for j in range(MAX_LEN - 5, t + 1))
        expected[t] = model.B(torch.cat([c_local, h[0, t]]))
    torch.testing.assert_close(model(x, mask)[0], expected, atol=1e-5, rtol=1e-5)


def test_lightsans_attention_aggregates_each_prefix_by_hand():
    """Position t: RecBole's item-to-interest aggregation over the real prefix s <= t only
    (softmax over s of K_s theta), the query's softmax over the k interests, plus the
    position attention over s <= t; a loop over t, one head at a time."""
    torch.manual_seed(0)
    d, h, k_int, L, n_real = 8, 2, 3, 6, 4
    layer = LowRankAttention(d, h, k_int, dropout=0.0).eval()
    x = torch.randn(1, L, d)
    x[0, :L - n_real] = 0
    position = torch.randn(L, d)
    mask = torch.arange(L) >= L - n_real
    allowed = torch.ones(L, L, dtype=torch.bool).tril() & (mask[None, :] | torch.eye(L, dtype=torch.bool))
    out = layer(x, position, allowed[None])[0]

    q, k, v = layer.qkv(x[0]).chunk(3, dim=-1)  # (L, d)
    p = layer.position_norm(position)
    pq, pk = layer.position_q(p), layer.position_k(p)
    dh = d // h
    for t in range(L - n_real, L):
        prefix = list(range(L - n_real, t + 1))
        K, V = k[prefix], v[prefix]  # (n, d)
        K_int = torch.softmax(K @ layer.theta_k, dim=0).T @ K  # (k, d): interests of the prefix
        V_int = torch.softmax(V @ layer.theta_v, dim=0).T @ V
        y = []
        for head in range(h):
            cols = slice(head * dh, (head + 1) * dh)
            P = torch.softmax(K_int[:, cols] @ q[t, cols] / dh ** 0.5, dim=0)  # (k,)
            Pp = torch.softmax(pk[prefix][:, cols] @ pq[t, cols] / (2 * dh) ** 0.5, dim=0)  # (n,)
            y.append(P @ V_int[:, cols] + Pp @ V[:, cols])
        expected = layer.norm(x[0, t] + layer.out(torch.cat(y)))
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


def test_spatial_gating_by_hand():
    """u_t * (sum_{s<=t} W[r_t, r_s] LayerNorm(v_s) + b[r_t]) over real s, indexed by recency
    (W's bottom-right block for a short input)."""
    torch.manual_seed(0)
    sgu = SpatialGatingUnit(d_ffn=6, max_len=MAX_LEN)
    with torch.no_grad():
        sgu.weight.normal_()  # far from its near-zero start
        sgu.bias.normal_()
    L, n_real = 5, 3
    z = torch.randn(1, L, 6)
    mask = (torch.arange(L) >= L - n_real)[None]
    out = sgu(z, mask)[0]
    u, v = z[0, :, :3], sgu.norm(z[0, :, 3:])
    for t in range(L - n_real, L):
        row = MAX_LEN - L + t  # the position's index in the max_len window
        mixed = sum(sgu.weight[row, MAX_LEN - L + s] * v[s] for s in range(L - n_real, t + 1))
        torch.testing.assert_close(out[t], u[t] * (mixed + sgu.bias[row]))


def test_backbone_settings_reach_the_backbone():
    """k_interests, a FAERecConfig field, sizes LightSANs' aggregation; num_heads must divide d."""
    from model.config import FAERecConfig, Invalid
    from model.methods import build_model
    model = build_model(FAERecConfig(method="base", backbone="lightsans", hidden_size=8, k_interests=3), n_items=5)
    assert model.backbone.blocks[0].attn.theta_k.shape == (8, 3)
    with pytest.raises(Invalid, match="num_heads"):
        FAERecConfig(backbone="lightsans", hidden_size=8, num_heads=3)


@pytest.mark.parametrize("name", ["sasrec", "narm"])
def test_whole_batch_path_equals_the_packed_one(name):
    """The GPU layout (every position, no host sync) computes what packing the real positions
    does: same outputs at real positions, zeros at padding, whatever the padding holds."""
    model = make(name)
    x = torch.randn(7, MAX_LEN, D, generator=torch.Generator().manual_seed(5))
    mask = torch.arange(MAX_LEN) >= MAX_LEN - torch.tensor([8, 1, 5, 0, 3, 8, 2])[:, None]  # incl. an empty row
    packed, packed_last = model(x, mask), model(x, mask, last_only=True)
    model.packed = False
    noisy = x.masked_fill(~mask.unsqueeze(-1), 100.0)
    torch.testing.assert_close(model(noisy, mask), packed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(noisy, mask, last_only=True), packed_last, atol=1e-5, rtol=1e-5)
