"""Mult-VAE^PR and Mult-DAE (Liang et al., WWW 2018) and RecVAE (Shenbin et al., WSDM 2020).

Generative model (Eq. 1): z ~ N(0, I_K), pi = softmax(f_theta(z)), x_u ~ Mult(N_u, pi).
Inference model: q_phi(z | x_u) = N(mu_phi(x_u), diag sigma^2_phi(x_u)) for the VAE,
a point estimate z = g_phi(x_u) for the DAE. Both rank items by the decoder logits f_theta(z)
with z the encoder mean (Section 2.4).

RecVAE (``kind="recvae"``) keeps the multinomial decoder (one linear layer K -> I) and the
fold-in at the encoder mean, so it serves exactly like Mult-VAE. Its encoder is densely
connected: every hidden layer h_j = LayerNorm(swish(W_j h_{j-1} + h_1 + ... + h_{j-1})), all
hidden layers one width. Its prior is a mixture of N(0, I), the previous encoder's posterior
and a wide N(0, e^10 I) (:meth:`MultVAE.composite_prior_log_density`); the alternating
encoder/decoder updates and beta = gamma * |x_u| live in the training loop.

The first layer never sees a dense user x item batch: the L2-normalised click rows arrive as
a :class:`SparseRows` (CSR pieces) and go through ``embedding_bag`` with per-sample weights
(its gradient as one sparse-dense product),
which is exactly ``x @ W`` for a sparse ``x``; memory grows with clicks, not users x items.
With ``sparse_grad=True`` (the sampled softmax, for catalogues of millions of items) that
gradient is a sparse tensor over the batch's clicked rows instead of a dense ``(I, h)`` one,
for ``torch.optim.SparseAdam``.
The training state (beta schedule, step counter) lives in the training loop, not here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ModelKind = Literal["multvae", "multdae", "recvae"]
MODEL_KINDS: tuple[ModelKind, ...] = ("multvae", "multdae", "recvae")
# RecVAE's composite prior: weights of N(0, I), the old posterior and N(0, e^10 I).
PRIOR_WEIGHTS = (3 / 20, 3 / 4, 1 / 10)
WIDE_PRIOR_LOGVAR = 10.0
RECVAE_LAYER_NORM_EPS = 0.1
Likelihood = Literal["multinomial", "gaussian", "logistic"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, with the paper's names: ``p_dims`` is the generative model [K, ..., I]."""

    p_dims: tuple[int, ...]  # [K, ..., I]: the last entry is the item count
    kind: ModelKind = "multvae"
    q_dims: tuple[int, ...] | None = None  # inference model [I, ..., K]; None = reversed p_dims
    dropout: float = 0.5  # on the L2-normalised input, training only
    likelihood: Likelihood = "multinomial"
    # Gaussian likelihood confidence weights (Hu et al.): c1 on clicks, c0 on the zeros.
    gaussian_c0: float = 1.0
    gaussian_c1: float = 10.0
    # The item-item path (fitted after training): each item's ``item_neighbours`` strongest EASE
    # weights, added to the decoder logits times ``item_weight``; 0 neighbours = none.
    item_neighbours: int = 0
    item_weight: float = 0.0

    def __post_init__(self) -> None:
        if len(self.p_dims) < 2 or any(d <= 0 for d in self.p_dims):
            raise ValueError(f"p_dims must be >= 2 positive sizes [K, ..., I], got {self.p_dims}")
        q = self.encoder_dims
        if q[0] != self.p_dims[-1] or q[-1] != self.p_dims[0]:
            raise ValueError(
                f"q_dims {q} must start at I={self.p_dims[-1]} and end at K={self.p_dims[0]}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.kind == "recvae":
            if len(self.p_dims) != 2:
                raise ValueError(
                    f"a RecVAE decoder is one layer: p_dims must be [K, I], got {self.p_dims}"
                )
            if len(q) < 3 or len(set(q[1:-1])) != 1:
                raise ValueError(
                    f"a RecVAE encoder needs >= 1 hidden layer, all of one width (dense "
                    f"connections add them): q_dims [I, H, ..., H, K], got {q}"
                )
        if self.item_neighbours < 0 or self.item_weight < 0.0:
            raise ValueError(
                f"item_neighbours and item_weight must be >= 0, got {self.item_neighbours} "
                f"and {self.item_weight}"
            )
        if self.likelihood not in ("multinomial", "gaussian", "logistic"):
            raise ValueError(
                f"likelihood must be multinomial, gaussian or logistic, got {self.likelihood!r}"
            )

    @classmethod
    def default(cls, kind: ModelKind, n_items: int, **overrides: Any) -> ModelConfig:
        """The papers' architectures: VAE [I -> 600 -> 200 -> 600 -> I], DAE [I -> 200 -> I],
        RecVAE [I -> 5 x 600 -> 200 -> I]."""
        if kind == "recvae":
            return cls(kind=kind, p_dims=(200, n_items), q_dims=(n_items, *(600,) * 5, 200),
                       **overrides)
        p_dims = (200, 600, n_items) if kind == "multvae" else (200, n_items)
        return cls(kind=kind, p_dims=p_dims, **overrides)

    @property
    def n_items(self) -> int:
        return self.p_dims[-1]

    @property
    def latent_dim(self) -> int:
        return self.p_dims[0]

    @property
    def encoder_dims(self) -> tuple[int, ...]:
        return tuple(self.q_dims) if self.q_dims is not None else tuple(reversed(self.p_dims))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        fields = dict(data)
        fields["p_dims"] = tuple(fields["p_dims"])
        if fields.get("q_dims") is not None:
            fields["q_dims"] = tuple(fields["q_dims"])
        return cls(**fields)


@dataclass
class SparseRows:
    """A batch of click rows in CSR pieces: row b owns ``indices[offsets[b]:offsets[b+1]]``."""

    indices: Tensor  # (nnz,) int64 item columns
    offsets: Tensor  # (B + 1,) int64
    values: Tensor  # (nnz,) float32 click counts (1.0 for binarised data)
    n_items: int
    _rows: Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_csr(cls, x: sp.csr_matrix, device: torch.device | str = "cpu") -> SparseRows:
        x = sp.csr_matrix(x)
        return cls(
            indices=torch.from_numpy(x.indices.astype(np.int64)).to(device),
            offsets=torch.from_numpy(x.indptr.astype(np.int64)).to(device),
            values=torch.from_numpy(x.data.astype(np.float32)).to(device),
            n_items=x.shape[1],
        )

    @property
    def batch_size(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def rows(self) -> Tensor:
        """(nnz,) the row of every stored entry."""
        if self._rows is None:
            lengths = self.offsets[1:] - self.offsets[:-1]
            self._rows = torch.repeat_interleave(
                torch.arange(self.batch_size, device=self.indices.device), lengths
            )
        return self._rows

    def row_sums(self) -> Tensor:
        """(B,) N_u, the total clicks per row."""
        out = torch.zeros(self.batch_size, device=self.values.device)
        return out.index_add_(0, self.rows, self.values)

    def to_dense(self) -> Tensor:
        """(B, I) dense copy; for tests and the dense reference path only."""
        out = torch.zeros(self.batch_size, self.n_items, device=self.values.device)
        out[self.rows, self.indices] = self.values
        return out


class _SparseMatmul(torch.autograd.Function):
    """``x @ W`` for sparse rows x given as CSR pieces with per-entry ``weights``.

    Forward is one ``embedding_bag`` (sum of the weighted rows of W). Backward computes
    ``dW = x^T @ grad`` as a single sparse-dense product: ``embedding_bag``'s own backward
    sorts every index of the batch, which costs more than the dense matmul it replaces.
    """

    @staticmethod
    def forward(
        ctx: Any, weight: Tensor, indices: Tensor, offsets: Tensor, weights: Tensor, rows: Tensor
    ) -> Tensor:
        ctx.save_for_backward(indices, weights, rows)
        ctx.n_items, ctx.batch = weight.shape[0], offsets.numel() - 1
        return F.embedding_bag(
            indices, weight, offsets[:-1], mode="sum", per_sample_weights=weights
        )  # (B, h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        indices, weights, rows = ctx.saved_tensors
        x_t = torch.sparse_coo_tensor(
            torch.stack([indices, rows]),
            weights,
            (ctx.n_items, ctx.batch),
            check_invariants=False,  # built from a valid CSR batch
        )  # (I, B)
        return torch.sparse.mm(x_t, grad), None, None, None, None  # (I, h)


def _glorot_(weight: Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)


def _bias_(bias: Tensor) -> None:
    # The reference initialises biases from a truncated normal with std 0.001.
    nn.init.trunc_normal_(bias, std=0.001, a=-0.002, b=0.002)


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _log_normal(z: Tensor, mu: Tensor, logvar: Tensor | float) -> Tensor:
    """Elementwise log N(z; mu, exp(logvar))."""
    logvar_t = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    return -0.5 * (logvar_t + math.log(2 * math.pi) + (z - mu) ** 2 / logvar_t.exp())


class MultVAE(nn.Module):
    """Mult-VAE^PR, Mult-DAE or RecVAE (``config.kind``) from one config."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        q = config.encoder_dims
        # Layer output sizes; the VAE's last encoder layer emits mean and log-variance (2K).
        outs = list(q[1:])
        if config.kind != "multdae":
            outs[-1] *= 2
        # First encoder layer as an (I, h) table so sparse rows go through embedding_bag.
        self.input_weight = nn.Parameter(torch.empty(q[0], outs[0]))  # (I, h1)
        self.input_bias = nn.Parameter(torch.empty(outs[0]))
        _glorot_(self.input_weight, q[0], outs[0])
        _bias_(self.input_bias)
        self.encoder = nn.ModuleList(
            nn.Linear(d_in, d_out) for d_in, d_out in zip(q[1:-1], outs[1:], strict=True)
        )
        p = config.p_dims
        self.decoder = nn.ModuleList(
            nn.Linear(d_in, d_out) for d_in, d_out in itertools.pairwise(p)
        )
        for layer in [*self.encoder, *self.decoder]:
            _glorot_(layer.weight, layer.in_features, layer.out_features)
            _bias_(layer.bias)
        # RecVAE: one LayerNorm per hidden layer (absent for the others: their weights are
        # unchanged, so versions written before RecVAE existed load as they are).
        self.norms = nn.ModuleList(
            nn.LayerNorm(width, eps=RECVAE_LAYER_NORM_EPS)
            for width in (q[1:-1] if config.kind == "recvae" else ())
        )
        # The item-item path: row c holds item c's neighbours and their EASE weights B[c, j].
        # Buffers, not parameters: fitted in closed form after training, never by the optimiser.
        # Only where there is a path, so versions without one keep their state dict.
        width = config.item_neighbours
        shape = (config.n_items, width)
        self.neighbours: Tensor | None
        self.neighbour_weights: Tensor | None
        self.register_buffer("neighbours", torch.zeros(shape, dtype=torch.int64) if width else None)
        self.register_buffer("neighbour_weights", torch.zeros(shape) if width else None)

    # -- encoder ---------------------------------------------------------------------------

    def _first_layer(self, x: SparseRows, dropout: float, sparse_grad: bool = False) -> Tensor:
        # L2-normalise each row, then input dropout on the surviving entries (scaled 1/(1-p)),
        # exactly F.dropout(F.normalize(dense_x)) restricted to the non-zeros.
        norms = torch.zeros(x.batch_size, device=x.values.device)
        norms.index_add_(0, x.rows, x.values * x.values)
        norms = norms.clamp_min(1e-24).sqrt()
        weights = x.values / norms[x.rows]
        if dropout > 0.0:
            keep = torch.rand_like(weights) >= dropout
            weights = torch.where(keep, weights / (1.0 - dropout), torch.zeros_like(weights))
        if sparse_grad:  # the same forward; the gradient holds the clicked rows alone
            h = F.embedding_bag(
                x.indices, self.input_weight, x.offsets[:-1], mode="sum",
                per_sample_weights=weights, sparse=True,
            )  # fmt: skip
        else:
            h = _SparseMatmul.apply(self.input_weight, x.indices, x.offsets, weights, x.rows)
        return h + self.input_bias  # (B, q1)

    def encode(self, x: SparseRows, sparse_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        """(mu, logvar) for the VAEs, (g(x), None) for the DAE; dropout only in training.
        ``sparse_grad``: the input table's gradient as a sparse tensor (module docstring)."""
        dropout = self.config.dropout if self.training else 0.0
        return self.encode_with_dropout(x, dropout, sparse_grad)

    def encode_with_dropout(
        self, x: SparseRows, dropout: float, sparse_grad: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`encode` with an explicit input dropout (RecVAE's decoder steps use 0)."""
        h = self._first_layer(x, dropout, sparse_grad)
        if self.config.kind == "recvae":
            return self._dense_encoder(h)
        # tanh between layers; the VAE's Gaussian parameters get no activation.
        dae = self.config.kind == "multdae"
        n_layers = 1 + len(self.encoder)
        if n_layers > 1 or dae:
            h = torch.tanh(h)
        for i, layer in enumerate(self.encoder, start=2):
            h = layer(h)
            if i < n_layers or dae:
                h = torch.tanh(h)
        if self.config.kind == "multdae":
            return h, None  # (B, K)
        k = self.config.latent_dim
        return h[:, :k], h[:, k:]  # (B, K), (B, K)

    def _dense_encoder(self, h: Tensor) -> tuple[Tensor, Tensor]:
        # h_1 = LN(swish(x W_1)); h_j = LN(swish(h_{j-1} W_j + h_1 + ... + h_{j-1})).
        h = self.norms[0](_swish(h))
        skip = h
        for layer, norm in zip(self.encoder[:-1], self.norms[1:], strict=True):
            h = norm(_swish(layer(h) + skip))
            skip = skip + h
        out = self.encoder[-1](h)
        k = self.config.latent_dim
        return out[:, :k], out[:, k:]

    def decode_hidden(self, z: Tensor) -> Tensor:
        """The decoder up to its output layer: (B, K) -> (B, p_dims[-2]), the tanh applied."""
        h = z
        for layer in self.decoder[:-1]:
            h = torch.tanh(layer(h))
        return h

    @property
    def output_layer(self) -> nn.Linear:
        """The decoder's last layer, p_dims[-2] -> I: nearly all of a fold-in's arithmetic."""
        layer = self.decoder[-1]
        assert isinstance(layer, nn.Linear)
        return layer

    def decode(self, z: Tensor) -> Tensor:
        """Decoder logits f_theta(z): (B, K) -> (B, I)."""
        return self.output_layer(self.decode_hidden(z))

    def item_path(self, x: SparseRows) -> Tensor:
        """(B, I) the item-item path's scores x B over the stored neighbours (zero without)."""
        out = torch.zeros(x.batch_size, self.config.n_items, device=x.values.device)
        if self.neighbours is not None and self.neighbour_weights is not None:
            cols = self.neighbours[x.indices]  # (nnz, m)
            weights = self.neighbour_weights[x.indices] * x.values[:, None]
            out.index_put_((x.rows[:, None].expand_as(cols), cols), weights, accumulate=True)
        return out

    def fold_in(self, x: SparseRows) -> Tensor:
        """(B, I) the scores a history ranks items by: the decoder logits at the encoder mean
        (Section 2.4), plus ``item_weight`` times the item-item path where there is one."""
        logits = self.decode(self.encode(x)[0])
        if self.config.item_neighbours:
            logits = logits + self.config.item_weight * self.item_path(x)
        return logits

    def latent(
        self, x: SparseRows, sparse_grad: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(z, mu, logvar); z is sampled by reparameterisation in training, z = mu else."""
        mu, logvar = self.encode(x, sparse_grad)
        z = mu
        if self.training and logvar is not None:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return z, mu, logvar

    def forward(self, x: SparseRows) -> tuple[Tensor, Tensor, Tensor | None]:
        """(logits, mu, logvar): :meth:`latent`, then the decoder over every item."""
        z, mu, logvar = self.latent(x)
        return self.decode(z), mu, logvar

    # -- objective -------------------------------------------------------------------------

    def neg_log_likelihood(self, logits: Tensor, x: SparseRows) -> Tensor:
        """Mean over the batch of -log p(x_u | z_u), Eq. 2-4, without densifying x."""
        return -self.log_likelihood_rows(logits, x).mean()

    def log_likelihood_rows(self, logits: Tensor, x: SparseRows) -> Tensor:
        """(B,) log p(x_u | z_u) per row, without densifying x."""
        at_clicks = logits[x.rows, x.indices]  # (nnz,) f_ui on the clicked items
        likelihood = self.config.likelihood
        if likelihood == "multinomial":
            # sum_i x_ui log softmax(f)_i = sum_i x_ui f_ui - N_u logsumexp(f_u)
            log_norm = torch.logsumexp(logits, dim=1)  # (B,)
            ll = _row_sum(x.values * at_clicks, x) - x.row_sums() * log_norm
        elif likelihood == "gaussian":
            # -sum_i c_ui/2 (x_ui - f_ui)^2: c0 everywhere, corrected to c1 on the clicks.
            c0, c1 = self.config.gaussian_c0, self.config.gaussian_c1
            on_clicks = c1 * (x.values - at_clicks) ** 2 - c0 * at_clicks**2
            ll = -0.5 * (c0 * (logits**2).sum(dim=1) + _row_sum(on_clicks, x))
        else:
            # sum_i x log s(f) + (1 - x) log(1 - s(f)) = sum_i -softplus(f_i) + sum_i x_ui f_ui
            ll = -F.softplus(logits).sum(dim=1) + _row_sum(x.values * at_clicks, x)
        return ll

    @staticmethod
    def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
        """Mean over the batch of KL(N(mu, sigma^2) || N(0, I))."""
        return (0.5 * (-logvar + logvar.exp() + mu**2 - 1.0)).sum(dim=1).mean()

    @staticmethod
    def composite_prior_kl(
        z: Tensor, mu: Tensor, logvar: Tensor, old_mu: Tensor, old_logvar: Tensor
    ) -> Tensor:
        """(B,) one-sample estimate of KL(q(z|x) || p(z)) under RecVAE's composite prior.

        p(z) = 3/20 N(0, I) + 3/4 N(old_mu, old_sigma^2) + 1/10 N(0, e^10 I) per dimension,
        with (old_mu, old_logvar) the previous-epoch encoder's posterior for the same user.
        """
        components = torch.stack(
            [
                _log_normal(z, torch.zeros_like(z), 0.0) + math.log(PRIOR_WEIGHTS[0]),
                _log_normal(z, old_mu, old_logvar) + math.log(PRIOR_WEIGHTS[1]),
                _log_normal(z, torch.zeros_like(z), WIDE_PRIOR_LOGVAR)
                + math.log(PRIOR_WEIGHTS[2]),
            ],
            dim=-1,
        )
        log_prior = torch.logsumexp(components, dim=-1)
        return (_log_normal(z, mu, logvar) - log_prior).sum(dim=1)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The inference network's parameters (RecVAE updates them apart from the decoder's)."""
        return [self.input_weight, self.input_bias, *self.encoder.parameters(),
                *self.norms.parameters()]

    def l2_penalty(self) -> Tensor:
        """Sum of squared weights (biases excluded), the DAE's weight decay term."""
        total = (self.input_weight**2).sum()
        for layer in [*self.encoder, *self.decoder]:
            total = total + (layer.weight**2).sum()
        return total

    def l2_penalty_rows(self, input_rows: Tensor, output_rows: Tensor) -> Tensor:
        """:meth:`l2_penalty` with the two I-row tables (the input layer and the output layer)
        restricted to the given distinct rows, their gradients sparse (the sampled softmax)."""
        total = F.embedding(input_rows, self.input_weight, sparse=True).square().sum()
        for layer in [*self.encoder, *self.decoder[:-1]]:
            total = total + layer.weight.square().sum()
        rows = F.embedding(output_rows, self.output_layer.weight, sparse=True)
        return total + rows.square().sum()


def _row_sum(values: Tensor, x: SparseRows) -> Tensor:
    return torch.zeros(x.batch_size, device=values.device).index_add_(0, x.rows, values)
