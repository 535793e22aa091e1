"""Sampled softmax: the multinomial likelihood at a cost sub-linear in the item count.

The multinomial log-likelihood of a user (Eq. 2-4) is ``sum_i x_ui f_ui - N_u log Z_u`` with
``Z_u = sum_j exp(f_uj)`` over all I items: every update scores the whole catalogue. Here
``Z_u`` is estimated by importance sampling (Bengio & Senecal 2008; Jean et al. 2015, with
the "accidental hit" removal of TensorFlow's ``sampled_softmax_loss``):

* the user's own clicked items P_u enter ``Z_u`` exactly;
* the rest of the catalogue is estimated from ``m`` items drawn with replacement from a
  proposal ``Q`` (one draw shared by the whole batch): ``sum_{j not in P_u} exp(f_uj)`` ~
  ``sum_s 1[j_s not in P_u] exp(f_{u j_s}) / (m Q(j_s))``, i.e. each sampled logit is
  corrected by ``- log(m Q(j))`` ("log-Q correction") and a sample the user clicked is
  dropped, as it is already counted exactly.

So ``log Z_u ~ logsumexp({f_ui : i in P_u} u {f_uj - log(m Q(j)) : j sampled, not in P_u})``;
the estimate inside the log is unbiased, and the estimator becomes exact as m grows (and for
any m when Q is proportional to exp(f_u)). ``Q`` is the training popularity smoothed as
``(clicks_j + 1) ** 0.75`` (word2vec's unigram^0.75), so no item has zero probability.

Per update only the output-layer rows of the batch's clicks and of the sampled items are
gathered (``W[j]``, ``b[j]``): the (B, I) logits are never formed. The encoder's first layer
stays the sparse ``embedding_bag`` of :class:`multvae.model.MultVAE`. The trained model is an
ordinary :class:`~multvae.model.MultVAE`: it folds in, is written and served like any other.

The two ``I x h`` weight tables (the input layer and the output layer) get sparse gradients,
over the rows the batch touched, and are optimised by lazy Adam (``torch.optim.SparseAdam``:
a row's moments and weights change only in the updates that touch it), everything else by
Adam (:func:`optimisers`); a dense Adam step would read and write every row of both tables
(and their two moments) on every update, which at a million items costs more than the rest of
the update. Mult-DAE's L2 penalty (``weight_decay``) follows: it covers the touched rows of the
two tables and every weight of the small dense layers (``l2`` below), so a row is decayed in
the updates that use it, as in SGD matrix factorisation, rather than in every update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor

from multvae.model import MultVAE, SparseRows

POPULARITY_EXPONENT = 0.75  # Q(j) ~ (clicks_j + 1) ** 0.75

# (model, batch) -> (mean negative log-likelihood, mu, logvar)
Objective = Callable[[MultVAE, SparseRows], tuple[Tensor, Tensor, Tensor | None]]


def full_softmax(model: MultVAE, x: SparseRows) -> tuple[Tensor, Tensor, Tensor | None]:
    """The model's own likelihood over every item (the paper's; the default)."""
    logits, mu, logvar = model(x)
    return model.neg_log_likelihood(logits, x), mu, logvar


class SampledSoftmax:
    """The multinomial negative log-likelihood with ``log Z_u`` estimated from ``n_samples``
    draws of a proposal ``Q`` shared by the batch (see the module docstring)."""

    def __init__(self, proposal: Tensor, n_samples: int) -> None:
        if n_samples < 1:
            raise ValueError(f"the sampled softmax needs >= 1 sample per batch, got {n_samples}")
        if proposal.ndim != 1 or not bool((proposal > 0).all()):
            raise ValueError("the proposal must be a vector of positive item weights")
        self.proposal = proposal / proposal.sum()  # Q, (I,)
        self.log_proposal = self.proposal.log()
        self.n_samples = n_samples

    @classmethod
    def from_clicks(
        cls, train: sp.csr_matrix, n_samples: int, device: torch.device | str = "cpu"
    ) -> SampledSoftmax:
        """Q from the training clicks: ``(users who clicked j + 1) ** 0.75``."""
        clicks = np.asarray((sp.csr_matrix(train) > 0).sum(axis=0), dtype=np.float64).ravel()
        weights = torch.from_numpy((clicks + 1.0) ** POPULARITY_EXPONENT).float()
        return cls(weights.to(device), n_samples)

    def __call__(
        self, model: MultVAE, x: SparseRows, l2: float = 0.0
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(mean negative log-likelihood + ``l2`` x the L2 penalty of the touched rows, mu,
        logvar); the two I-row weight tables' gradients are sparse (module docstring)."""
        z, mu, logvar = model.latent(x, sparse_grad=True)
        h = model.decode_hidden(z)  # (B, d)
        layer = model.output_layer
        draws = torch.multinomial(self.proposal, self.n_samples, replacement=True)
        sampled, counts = torch.unique(draws, sorted=True, return_counts=True)  # (m',)
        # Only the clicked and sampled rows of W (I, d) and b (I,) are gathered. (Gathers by
        # index_select, not h[rows]: the latter's backward sums repeated rows in an order
        # that varies between runs on several CPU threads, and a resumed run must match.)
        ids = torch.cat([x.indices, sampled])
        weight = F.embedding(ids, layer.weight, sparse=True)  # (nnz + m', d)
        bias = layer.bias.index_select(0, ids)  # (nnz + m',)
        nnz = x.indices.numel()
        # f_ui at every click, from the clicked items' rows alone.
        at_clicks = (h.index_select(0, x.rows) * weight[:nnz]).sum(dim=1) + bias[:nnz]  # (nnz,)
        # A draw of j repeated c times is c terms exp(f_j) / (m Q(j)): one column, + log c.
        correction = counts.float().log() - math.log(self.n_samples) - self.log_proposal[sampled]
        logits = h @ weight[nnz:].T + bias[nnz:] + correction  # (B, m')
        # Accidental hits: a sampled item the user clicked is already in P_u, exactly.
        where = torch.searchsorted(sampled, x.indices).clamp_max(sampled.numel() - 1)
        hit = sampled[where] == x.indices
        logits = logits.index_put(
            (x.rows[hit], where[hit]), torch.tensor(-math.inf, device=logits.device)
        )
        log_z = torch.logaddexp(_row_logsumexp(at_clicks, x), torch.logsumexp(logits, dim=1))
        clicked = torch.zeros(x.batch_size, device=h.device).index_add_(
            0, x.rows, x.values * at_clicks
        )
        loss = -(clicked - x.row_sums() * log_z).mean()
        if l2 > 0:
            loss = loss + l2 * model.l2_penalty_rows(torch.unique(x.indices), torch.unique(ids))
        return loss, mu, logvar


def optimisers(model: MultVAE, lr: float) -> list[torch.optim.Optimizer]:
    """Lazy Adam (``torch.optim.SparseAdam``) for the input and output layers' ``I x h`` weight
    tables, whose gradients hold only the batch's rows under :class:`SampledSoftmax`, and Adam
    for the rest: the hidden layers and the biases (the output bias is one dense float per
    item, 4 MB at a million items)."""
    tables = [model.input_weight, model.output_layer.weight]
    ids = {id(p) for p in tables}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [torch.optim.SparseAdam(tables, lr=lr), torch.optim.Adam(rest, lr=lr)]


def _row_logsumexp(values: Tensor, x: SparseRows) -> Tensor:
    """(B,) logsumexp of each row's entries (-inf for an empty row)."""
    peak = torch.full((x.batch_size,), -math.inf, device=values.device)
    peak = peak.scatter_reduce(0, x.rows, values.detach(), reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros(x.batch_size, device=values.device).index_add_(
        0, x.rows, torch.exp(values - safe[x.rows])
    )
    return total.log() + safe
