"""Backbones: the padding guarantees each one documents, causality, the LRU scan."""

import pytest
import torch

from model.backbones import BACKBONES, lru_recurrence, lru_scan

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


@pytest.mark.parametrize("name", ["sasrec", "lrurec"])
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
    for name in ("sasrec", "fmlprec"):
        with pytest.raises((ValueError, RuntimeError)):
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
