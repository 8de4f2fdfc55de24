"""Sequence encoders FAERec plugs into: SASRec, FMLP-Rec and LRURec (the paper's Table 2),
NARM, LightSANs and gMLP (its Table 4).

One interface: `Backbone(hidden_size, num_layers, num_heads, dropout, max_len)` and
`forward(x (B, L, d), mask (B, L) bool, True = real item) -> (B, L, d)`, with L <= max_len,
or only the last position's (B, d) with `last_only=True` (what ranking needs),
sequences left-padded (most recent item in the last column) and padded positions of the
output set to zero. The caller passes raw item embeddings; each backbone applies its own
input LayerNorm + dropout (as FMLP-Rec, LRURec and the FMLP-Rec codebase's SASRec that
FAERec's code builds on), so there is no `* sqrt(d)` scaling: the LayerNorm makes the scale
of the input (random init, PCA init or fused) irrelevant.

What each backbone guarantees about padding (tests/test_backbones.py checks each):
- every backbone: the output at real positions does not depend on what the padded
  positions of x contain (they are zeroed on entry and after every layer);
- SASRec, LRURec, NARM, LightSANs and gMLP: causal (the output at t only depends on
  inputs <= t) and unchanged by extra left padding (positions are counted from the most
  recent item); LightSANs and gMLP are bidirectional in their papers, causal here (see each);
- FMLP-Rec: NOT causal by design (the FFT filter mixes later positions into earlier
  ones, as in the original); it always computes on the full max_len window (shorter
  inputs are left-padded to it), so extra left padding up to max_len changes nothing.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class Dropout(nn.Module):
    """nn.Dropout with the mask drawn as uniform >= p: the same distribution, but half the
    CPU time of bernoulli_, which took a sixth of a SASRec step. Draws in float32 whatever
    x's dtype (a bf16 uniform has too few steps to hit p)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        scale = (torch.rand(x.shape, device=x.device) >= self.p) * (1 / (1 - self.p))  # kept: 1/(1-p), dropped: 0
        return x * scale.to(x.dtype)

    def extra_repr(self):
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Point-wise feed-forward network, d -> 4d -> d (inner size as the FMLP-Rec codebase)."""

    def __init__(self, d, dropout):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.dropout = Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class SequenceInput(nn.Module):
    """Input layer: LayerNorm(x + position embedding) -> dropout, padded positions zeroed.

    Position embeddings are indexed by recency (0 = most recent item), so the same
    sequence gets the same positions however much left padding surrounds it; with the
    usual padding to max_len this equals SASRec's absolute positions.
    """

    def __init__(self, d, max_len, dropout, positions):
        super().__init__()
        self.max_len = max_len
        self.position = nn.Embedding(max_len, d) if positions else None
        self.norm = nn.LayerNorm(d)
        self.dropout = Dropout(dropout)

    def embed(self, x, recency):
        """x (..., d) and each position's recency (...) -> LayerNorm(x + position) -> dropout."""
        if self.position is not None:
            x = x + self.position(recency)
        return self.dropout(self.norm(x))

    def forward(self, x, mask):
        L = x.size(1)
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.max_len}")
        recency = torch.arange(L - 1, -1, -1, device=x.device)  # (L,)
        return self.embed(x, recency) * mask.unsqueeze(-1)  # (B, L, d)


# --------------------------------------------------------------------------- SASRec


@dataclass
class AttentionWindow:
    """Rows of similar length attended together, in a grid as wide as the longest of them.

    Packed tokens [start, stop) fill the grid's `cells` (flat indices into (rows * width),
    each row's tokens right-aligned, in order); `blocked` (rows, 1, width, width) masks
    later and padded keys.
    """

    start: int
    stop: int
    cells: torch.Tensor
    blocked: torch.Tensor


def attention_windows(lengths, rows_per_window):
    """Windows over rows sorted longest first, `lengths` (B,): a batch's attention costs
    sum(rows * width^2) instead of B * L^2 (on Beauty most rows hold under 10 of 50 items)."""
    sizes, windows, start = lengths.tolist(), [], 0
    for first in range(0, len(sizes), rows_per_window):
        width, stop = sizes[first], start + sum(sizes[first:first + rows_per_window])
        if width == 0:  # this row and every later one is all padding
            break
        cols = torch.arange(width, device=lengths.device)
        real = cols >= width - lengths[first:first + rows_per_window, None]  # (rows, width)
        windows.append(AttentionWindow(start, stop, real.reshape(-1).nonzero().squeeze(1), blocked_keys(real)))
        start = stop
    return windows


def blocked_keys(real):
    """(rows, 1, width, width) True where a query may not look: later keys, padded keys
    (real (rows, width)); a padded query attends to itself so that no row is fully masked (NaN)."""
    width = real.size(1)
    cols = torch.arange(width, device=real.device)
    allowed = (cols[:, None] >= cols) & (real[:, None, :] | torch.eye(width, dtype=torch.bool, device=real.device))
    return ~allowed[:, None]


def whole_batch_window(mask):
    """Every row of a (B, L) batch in one window, padding included: no shape depends on the
    data, so a GPU never waits for the host (packing needs the lengths on the host)."""
    B, L = mask.shape
    return AttentionWindow(0, B * L, torch.arange(B * L, device=mask.device), blocked_keys(mask))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; the query is LayerNorm(x), keys/values x (SASRec.pytorch).

    Works on packed tokens (N, d): projections run on them only, the attention itself window
    by window (`attention_windows`).
    """

    def __init__(self, d, num_heads, dropout):
        super().__init__()
        if d % num_heads:
            raise ValueError(f"hidden_size {d} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.dropout = Dropout(dropout)

    def forward(self, query, x, windows, last_only=False):
        """query, x (N, d) packed, in the windows' order -> (N, d), or with last_only each
        window row's last position only (rows, d)."""
        N, d = x.shape
        qkv = torch.cat([self.q(query), self.kv(x)], dim=-1)  # (N, 3d)
        out = []
        for w in windows:
            rows, _, width, _ = w.blocked.shape
            grid = qkv.new_zeros(rows * width, 3 * d).index_copy_(0, w.cells, qkv[w.start:w.stop])  # zeros at padding
            q, k, v = grid.view(rows, width, 3 * self.num_heads, -1).transpose(1, 2).chunk(3, dim=1)  # (rows, h, width, d/h)
            blocked = w.blocked
            if last_only:  # rows are right-aligned: every row's last position is the last column
                q, blocked = q[:, :, -1:], blocked[:, :, -1:]
            # Written out rather than F.scaled_dot_product_attention: with dropout SDPA takes its
            # math path on CPU anyway, and drawing the mask here is cheaper (Dropout above).
            scores = (q @ k.transpose(-2, -1)) * (d // self.num_heads) ** -0.5  # (rows, h, width | 1, width)
            y = self.dropout(scores.masked_fill(blocked, -torch.inf).softmax(-1)) @ v  # (rows, h, width | 1, d/h)
            y = y.transpose(1, 2).reshape(-1, d)
            out.append(y if last_only else y.index_select(0, w.cells))
        return self.out(torch.cat(out) if out else qkv[:, :d])  # (N, d)


class SASRecBlock(nn.Module):
    def __init__(self, d, num_heads, dropout):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d, dropout)

    def forward(self, x, windows, ends=None):
        """ends: packed index of each row's last position, to compute only those (last layer, ranking)."""
        q = self.attn_norm(x)
        if ends is None:
            x = q + self.attn(q, x, windows)  # residual from the normalised query, as SASRec.pytorch
        else:
            x = q[ends] + self.attn(q, x, windows, last_only=True)[:len(ends)]  # empty rows come last
        x = self.ffn_norm(x)
        return x + self.ffn(x)


class SASRec(nn.Module):
    """Causal self-attention encoder (Kang & McAuley 2018, layout of SASRec.pytorch).

    Every per-position layer (input, projections, feed-forward, LayerNorms) runs on the real
    positions only, packed as (N, d): on short-sequence data most of a (B, max_len) batch is
    padding (90% on Beauty), whose outputs are zero anyway. Attention runs on windows of
    rows of similar length; causal attention only sees the order of a row's real items, so
    the result is the same as on the padded batch.
    """

    rows_per_window = 32  # fewer: tighter windows, more small operations
    packed = None  # None: packed on CPUs; on GPUs the whole padded batch (no host sync per step)

    def __init__(self, hidden_size, num_layers, num_heads, dropout, max_len):
        super().__init__()
        self.input = SequenceInput(hidden_size, max_len, dropout, positions=True)
        self.blocks = nn.ModuleList(SASRecBlock(hidden_size, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x, mask, last_only=False):
        B, L, d = x.shape
        if L > self.input.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.input.max_len}")
        if not (x.device.type == "cpu" if self.packed is None else self.packed):
            return self.forward_whole_batch(x, mask, last_only)
        lengths = mask.sum(1)  # (B,)
        order = lengths.argsort(descending=True, stable=True)  # rows, longest first
        real = (order[:, None] * L + torch.arange(L, device=x.device))[mask[order]]  # (N,) flat indices, rows in that order
        windows = attention_windows(lengths[order], self.rows_per_window)
        h = self.input.embed(x.reshape(B * L, d).index_select(0, real), L - 1 - real % L)  # (N, d)
        sorted_lengths = lengths[order]
        ends = sorted_lengths.cumsum(0)[sorted_lengths > 0] - 1 if last_only else None  # each non-empty row's last
        for i, block in enumerate(self.blocks):
            h = block(h, windows, ends if i == len(self.blocks) - 1 else None)
        h = self.norm(h)
        if last_only:  # the last layer ran only at each non-empty row's last position
            return h.new_zeros(B, d).index_copy_(0, order[:len(h)], h)  # (B, d)
        return h.new_zeros(B * L, d).index_copy_(0, real, h).view(B, L, d)  # zeros at padding

    def forward_whole_batch(self, x, mask, last_only):
        """The same layers on every position, padding too (its outputs are zeroed at the end)."""
        B, L, d = x.shape
        h = self.input.embed(x.reshape(B * L, d), torch.arange(L - 1, -1, -1, device=x.device).repeat(B))
        windows = [whole_batch_window(mask)]
        ends = torch.arange(L - 1, B * L, L, device=x.device) if last_only else None  # last column
        for i, block in enumerate(self.blocks):
            h = block(h, windows, ends if i == len(self.blocks) - 1 else None)
        h = self.norm(h)
        if last_only:
            return h * mask[:, -1:]  # (B, d); an all-padding row gives zeros
        return h.view(B, L, d) * mask.unsqueeze(-1)


# ------------------------------------------------------------------------- FMLP-Rec


class FilterLayer(nn.Module):
    """Learnable frequency-domain filter: LayerNorm(x + Dropout(irfft(rfft(x) * W)))."""

    def __init__(self, d, max_len, dropout):
        super().__init__()
        # Real and imaginary parts of W (L//2+1, d), initialised as FMLP-Rec (randn * 0.02).
        self.weight = nn.Parameter(torch.randn(max_len // 2 + 1, d, 2) * 0.02)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        L = x.size(1)
        spectrum = torch.fft.rfft(x, dim=1, norm="ortho")  # (B, L//2+1, d) complex
        filtered = torch.fft.irfft(spectrum * torch.view_as_complex(self.weight), n=L, dim=1, norm="ortho")  # (B, L, d)
        return self.norm(x + self.dropout(filtered))


class FMLPBlock(nn.Module):
    def __init__(self, d, max_len, dropout):
        super().__init__()
        self.filter = FilterLayer(d, max_len, dropout)
        self.ffn = FeedForward(d, dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = self.filter(x)
        return self.norm(x + self.ffn(x))


class FMLPRec(nn.Module):
    """All-MLP encoder with learnable filters (Zhou et al. 2022); not causal, see the module doc."""

    def __init__(self, hidden_size, num_layers, num_heads, dropout, max_len):
        super().__init__()
        self.max_len = max_len
        self.input = SequenceInput(hidden_size, max_len, dropout, positions=True)
        self.blocks = nn.ModuleList(FMLPBlock(hidden_size, max_len, dropout) for _ in range(num_layers))

    def forward(self, x, mask, last_only=False):
        x = self.input(x, mask)
        pad = self.max_len - x.size(1)  # the filter W is defined on the max_len window
        x = F.pad(x, (0, 0, pad, 0))  # (B, max_len, d)
        keep = F.pad(mask, (pad, 0), value=False).unsqueeze(-1)  # (B, max_len, 1)
        for block in self.blocks:
            x = block(x) * keep
        return x[:, -1] if last_only else x[:, pad:]


# --------------------------------------------------------------------------- LRURec


def lru_recurrence(lam, b):
    """h_t = lam * h_{t-1} + b_t with h_{-1} = 0, one step at a time (the definition).

    lam (N,) complex, b (B, L, N) complex -> h (B, L, N).
    """
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.size(1)):
        h = lam * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def lru_scan(lam, b):
    """The same recurrence as `lru_recurrence` by a parallel (Hillis-Steele) scan in ceil(log2 L) steps.

    Before the step with offset o, position t holds sum_{t-o < s <= t} lam^(t-s) b_s; adding
    lam^o times the value o positions earlier doubles that window. lam does not depend on
    t, so the joining coefficient is the same lam^o everywhere (no per-position products).
    """
    L, offset, power = b.size(1), 1, lam
    t = torch.arange(L, device=b.device).unsqueeze(-1)  # (L, 1)
    while offset < L:
        # roll + mask rather than slices: slicing's backward allocates and fills a full zero tensor
        coefficient = power * (t >= offset)  # (L, N): nothing wraps around from the end
        b = b + coefficient * torch.roll(b, offset, dims=1)  # (B, L, N)
        offset, power = 2 * offset, power * power
    return b


class LRULayer(nn.Module):
    """Linear recurrent unit (Orvieto et al. 2023): h_t = lambda h_{t-1} + gamma B x_t, y_t = Re(C h_t) + D x_t.

    lambda = exp(-exp(nu) + i exp(theta)) per state dimension, |lambda| initialised
    uniformly on the ring [r_min, r_max]; gamma = sqrt(1 - |lambda|^2) keeps the state's
    scale independent of lambda (computed from lambda, not learned separately).
    The state has 2d complex dimensions, as LRURec.
    """

    def __init__(self, d, dropout, r_min=0.8, r_max=0.99):
        super().__init__()
        n = 2 * d
        u1, u2 = torch.rand(n), torch.rand(n)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)))
        self.theta_log = nn.Parameter(torch.log(u2 * 2 * math.pi))
        self.B_re = nn.Parameter(torch.randn(n, d) / math.sqrt(2 * d))
        self.B_im = nn.Parameter(torch.randn(n, d) / math.sqrt(2 * d))
        self.C_re = nn.Parameter(torch.randn(d, n) / math.sqrt(n))
        self.C_im = nn.Parameter(torch.randn(d, n) / math.sqrt(n))
        self.D = nn.Parameter(torch.randn(d))
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        lam = torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))  # (n,)
        gamma = torch.sqrt(1 - lam.abs() ** 2)  # (n,)
        bx = torch.complex(x @ self.B_re.T, x @ self.B_im.T) * gamma  # (B, L, n)
        h = lru_scan(lam, bx)  # (B, L, n)
        y = h.real @ self.C_re.T - h.imag @ self.C_im.T + self.D * x  # Re(C h) + D x, (B, L, d)
        return self.norm(x + self.dropout(y))


class LRUBlock(nn.Module):
    def __init__(self, d, dropout):
        super().__init__()
        self.lru = LRULayer(d, dropout)
        self.ffn = FeedForward(d, dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = self.lru(x)
        return self.norm(x + self.ffn(x))


class LRURec(nn.Module):
    """Linear recurrence encoder (Yue et al. 2024), no position embeddings.

    Left padding leaves the state at exactly zero (padded inputs are zeroed, h_{-1} = 0),
    so padding never reaches the real positions.
    """

    def __init__(self, hidden_size, num_layers, num_heads, dropout, max_len):
        super().__init__()
        self.input = SequenceInput(hidden_size, max_len, dropout, positions=False)
        self.blocks = nn.ModuleList(LRUBlock(hidden_size, dropout) for _ in range(num_layers))

    def forward(self, x, mask, last_only=False):
        keep = mask.unsqueeze(-1)
        x = self.input(x, mask)
        for block in self.blocks:
            x = block(x) * keep
        return x[:, -1] if last_only else x




# ----------------------------------------------------------------------------- NARM


class NARM(nn.Module):
    """Neural attentive recommendation machine (Li et al. 2017; layout of RecBole's narm.py).

    A GRU encodes the sequence. At each position t, the global encoder is the hidden state
    h_t (eq. 5), the local one an attention over h_1..h_t with h_t as the query (eqs. 6-7,
    unnormalised weights as in the paper and RecBole); [c_local; c_global] -> dropout ->
    B (2d -> d), the paper's bilinear decoder up to the dot product with the items.

    Training has a target at every position, so each position's attention covers its own
    prefix only: the (t, j) pairs of every query position t with j > t masked, an (N, L, d)
    tensor for N query positions, where RecBole computes the last position's (B, L, d).
    `last_only` computes just that; on CPUs only the real positions are queries (padding's
    outputs are zero anyway), on GPUs every position (no host sync per step).
    No position embeddings: the GRU orders the items. The GRU has no biases (as RecBole),
    so zero (padded) inputs from the zero initial state keep the state at exactly zero:
    left padding never reaches the real positions, and padded h_j add nothing to c_local.
    """

    def __init__(self, hidden_size, num_layers, num_heads, dropout, max_len):
        super().__init__()
        d = hidden_size
        self.input = SequenceInput(d, max_len, dropout, positions=False)
        self.gru = nn.GRU(d, d, num_layers, bias=False, batch_first=True)
        self.A1 = nn.Linear(d, d, bias=False)  # eq. (7), on the attended states h_j
        self.A2 = nn.Linear(d, d, bias=False)  # eq. (7), on the query h_t
        self.v = nn.Linear(d, 1, bias=False)
        self.dropout = Dropout(dropout)
        self.B = nn.Linear(2 * d, d, bias=False)

    packed = None  # None: real positions only on CPUs; on GPUs every position (as SASRec)

    def forward(self, x, mask, last_only=False):
        h, _ = self.gru(self.input(x, mask))  # (B, L, d); zero at padding
        B, L, _ = h.shape
        packed = x.device.type == "cpu" if self.packed is None else self.packed
        if last_only:  # the query positions (rows, cols), N of them
            rows, cols = torch.arange(B, device=h.device), torch.full((B,), L - 1, device=h.device)
        elif packed:
            rows, cols = mask.nonzero(as_tuple=True)
        else:
            rows, cols = torch.arange(B * L, device=h.device).div(L, rounding_mode="floor"), torch.arange(L, device=h.device).repeat(B)
        query, keys = h[rows, cols], h[rows]  # (N, d), (N, L, d)
        # alpha_tj = v^T sigmoid(A1 h_j + A2 h_t), eq. (7), for j <= t only: (N, L)
        alpha = self.v(torch.sigmoid(self.A1(h)[rows] + self.A2(query)[:, None])).squeeze(-1)
        alpha = alpha * (torch.arange(L, device=h.device) <= cols[:, None])
        c_local = torch.bmm(alpha[:, None], keys).squeeze(1)  # (N, d), eq. (6)
        c = self.B(self.dropout(torch.cat([c_local, query], dim=-1)))  # (N, d), eq. (8) before the items
        if last_only:
            return c
        return c.new_zeros(B, L, c.size(-1)).index_put_((rows, cols), c) * mask.unsqueeze(-1)


# ------------------------------------------------------------------------ LightSANs


class LowRankAttention(nn.Module):
    """LightSANs' low-rank decomposed self-attention plus decoupled position attention
    (Fan et al. 2021), made causal.

    Item-to-interest aggregation: each position t aggregates the keys (and, with its own
    theta, the values) of its prefix s <= t into k latent interests,
    K~_tj = sum_s D_tsj K_s with D_t. = softmax over s <= t of (K_s theta_j); the query Q_t
    attends over those k interests. The original aggregates the whole sequence at once, so
    with a target at every position an early position would see the later items: here each
    position gets the interests of its own prefix (exactly what the original computes when
    run on that prefix alone). That costs (B, L, L, k) weights instead of (B, k, L) and an
    L x L attention like SASRec's: the paper's cost linear in L is given up for causality.
    Written out as one L x L attention over the values:
    sum_j P_tj V~_tj = sum_s (sum_j P_tj D'_tsj) V_s.

    Decoupled positions: a second attention from position embeddings alone,
    softmax_s((P_t Wq)(P_s Wk) / sqrt(2 d_h)) over s <= t, added to the item attention.
    Both softmaxes normalise over what a query attends to (the k interests; the keys
    s <= t); RecBole's normalise over the query positions (dim=-2), which mixes later
    queries into earlier ones.
    """

    def __init__(self, d, num_heads, k_interests, dropout):
        super().__init__()
        if d % num_heads:
            raise ValueError(f"hidden_size {d} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(d, 3 * d)
        # theta (d, k) of the aggregation, randn as RecBole (plain parameters: init_weights leaves them)
        self.theta_k = nn.Parameter(torch.randn(d, k_interests))
        self.theta_v = nn.Parameter(torch.randn(d, k_interests))
        self.position_norm = nn.LayerNorm(d)
        self.position_q = nn.Linear(d, d)
        self.position_k = nn.Linear(d, d)
        self.attn_dropout = Dropout(dropout)
        self.out = nn.Linear(d, d)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def heads(self, y):
        """(..., L, d) -> (..., h, L, d/h)."""
        return y.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)

    def forward(self, x, position, allowed, last_only=False):
        """x (B, L, d); position (L, d) embeddings; allowed (B, L, L): key s visible to query t
        -> (B, T, d) for the T query positions: all L, or with last_only the last one."""
        B, L, d = x.shape
        queries = slice(L - 1, L) if last_only else slice(0, L)
        allowed = allowed[:, queries]  # (B, t, s)
        scale = (d // self.num_heads) ** -0.5
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, L, d) each
        blocked = ~allowed.unsqueeze(-1)  # (B, t, s, 1)
        D_k = (k @ self.theta_k).unsqueeze(1).masked_fill(blocked, -torch.inf).softmax(2)  # (B, t, s, k)
        D_v = (v @ self.theta_v).unsqueeze(1).masked_fill(blocked, -torch.inf).softmax(2)  # (B, t, s, k)
        q, k, v = self.heads(q[:, queries]), self.heads(k), self.heads(v)  # (B, h, t | s, d/h)
        qk = (q @ k.transpose(-2, -1)) * scale  # (B, h, t, s)
        scores = torch.einsum("bhts,btsj->bhtj", qk, D_k)  # Q_t . K~_tj: (B, h, t, k)
        P = self.attn_dropout(scores.softmax(-1))  # over the k interests
        item_attention = torch.einsum("bhtj,btsj->bhts", P, D_v)  # (B, h, t, s)

        p = self.position_norm(position)  # (L, d)
        pq, pk = self.heads(self.position_q(p[queries])), self.heads(self.position_k(p))  # (h, t | s, d/h)
        position_scores = (pq @ pk.transpose(-2, -1)) * (2 * d // self.num_heads) ** -0.5  # (h, t, s)
        position_attention = position_scores.masked_fill(~allowed.unsqueeze(1), -torch.inf).softmax(-1)  # (B, h, t, s)

        y = ((item_attention + position_attention) @ v).transpose(1, 2).flatten(2)  # (B, t, d)
        return self.norm(x[:, queries] + self.dropout(self.out(y)))


class LightSANsBlock(nn.Module):
    def __init__(self, d, num_heads, k_interests, dropout):
        super().__init__()
        self.attn = LowRankAttention(d, num_heads, k_interests, dropout)
        self.ffn = FeedForward(d, dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, position, allowed, last_only=False):
        x = self.attn(x, position, allowed, last_only)  # post-LN, as RecBole's LightTransformerLayer
        return self.norm(x + self.ffn(x))


class LightSANs(nn.Module):
    """Low-rank decomposed self-attention encoder (Fan et al. 2021, layout of RecBole's
    lightsans.py), causal: see `LowRankAttention`. Positions enter through the decoupled
    position attention only, not the input; they are indexed by recency like SASRec's.

    k_interests: latent interests (RecBole's default 5; it suggests max_len / 10).
    """

    def __init__(self, hidden_size, num_layers, num_heads, dropout, max_len, k_interests=5):
        super().__init__()
        self.input = SequenceInput(hidden_size, max_len, dropout, positions=False)
        self.position = nn.Embedding(max_len, hidden_size)
        self.blocks = nn.ModuleList(LightSANsBlock(hidden_size, num_heads, k_interests, dropout)
                                    for _ in range(num_layers))

    def forward(self, x, mask, last_only=False):
        L = x.size(1)
        position = self.position(torch.arange(L - 1, -1, -1, device=x.device))  # (L, d), by recency
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        # Real keys only; a padded query attends to itself so that no row is fully masked (NaN).
        allowed = causal & (mask[:, None, :] | torch.eye(L, dtype=torch.bool, device=x.device))  # (B, t, s)
        keep = mask.unsqueeze(-1)
        x = self.input(x, mask)
        for block in self.blocks[:-1]:
            x = block(x, position, allowed) * keep
        # with last_only the last block computes the last position only (what ranking needs)
        x = self.blocks[-1](x, position, allowed, last_only) * (keep[:, -1:] if last_only else keep)  # (B, T, d)
        return x[:, -1] if last_only else x


# ----------------------------------------------------------------------------- gMLP


class SpatialGatingUnit(nn.Module):
    """s(Z) = Z1 * (W LayerNorm(Z2) + b) (Liu et al. 2021, eq. 2): W (max_len, max_len) mixes positions.

    W is lower-triangular, so position t mixes positions <= t only, and indexed by recency
    like every position here: a length-L input uses W's bottom-right L x L block, so extra
    left padding changes nothing. Padded positions of Z2 are zeroed before W (after the
    LayerNorm, whose bias would make them nonzero). W starts near zero and b at one, as the
    paper: each block starts as a per-position MLP. Plain parameters, which init_weights
    (normal 0.02 for nn.Linear) leaves alone.
    """

    def __init__(self, d_ffn, max_len):
        super().__init__()
        self.norm = nn.LayerNorm(d_ffn // 2)
        eps = 1e-3 / max_len  # "near zero"; the scale of lucidrains' g-mlp-pytorch
        self.weight = nn.Parameter(torch.empty(max_len, max_len).uniform_(-eps, eps))
        self.bias = nn.Parameter(torch.ones(max_len))

    def forward(self, z, mask):
        L = z.size(1)
        u, v = z.chunk(2, dim=-1)  # (B, L, d_ffn/2) each
        v = self.norm(v) * mask.unsqueeze(-1)
        W = self.weight[-L:, -L:].tril()  # (L, L)
        return u * (W @ v + self.bias[-L:, None])  # (B, L, d_ffn/2)


class GMLPBlock(nn.Module):
    """x + Dropout(W_out s(GELU(W_in LayerNorm(x)))), d -> 6d -> SGU -> 3d -> d (the paper's d_ffn = 6 d)."""

    def __init__(self, d, max_len, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj_in = nn.Linear(d, 6 * d)
        self.sgu = SpatialGatingUnit(6 * d, max_len)
        self.proj_out = nn.Linear(3 * d, d)
        self.dropout = Dropout(dropout)

    def forward(self, x, mask):
        z = F.gelu(self.proj_in(self.norm(x)))  # (B, L, 6d)
        return x + self.dropout(self.proj_out(self.sgu(z, mask)))


class GMLP(nn.Module):
    """Gated MLP encoder (Liu et al. 2021): pre-LN blocks with a causal spatial gating unit,
    a final LayerNorm; no position embeddings (W is position-specific)."""

    def __init__(self, hidden_size, num_layers, num_heads, dropout, max_len):
        super().__init__()
        self.max_len = max_len
        self.input = SequenceInput(hidden_size, max_len, dropout, positions=False)
        self.blocks = nn.ModuleList(GMLPBlock(hidden_size, max_len, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x, mask, last_only=False):
        if x.size(1) > self.max_len:  # also when FAERec's PreparedInput (no check) replaces self.input
            raise ValueError(f"sequence length {x.size(1)} exceeds max_len {self.max_len}")
        keep = mask.unsqueeze(-1)
        x = self.input(x, mask)
        for block in self.blocks:
            x = block(x, mask) * keep
        x = self.norm(x) * keep
        return x[:, -1] if last_only else x


BACKBONES = {"sasrec": SASRec, "fmlprec": FMLPRec, "lrurec": LRURec,
             "narm": NARM, "lightsans": LightSANs, "gmlp": GMLP}
# FAERecConfig fields a backbone takes beyond the shared five, passed by name
BACKBONE_SETTINGS = {"lightsans": ("k_interests",)}
