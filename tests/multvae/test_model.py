"""The model: sparse first layer, likelihoods, KL, init, shapes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from multvae.model import ModelConfig, MultVAE, SparseRows


def _batch(n_users: int = 6, n_items: int = 40, seed: int = 0) -> sp.csr_matrix:
    x = sp.random(n_users, n_items, density=0.2, format="csr", random_state=seed)
    x.data[:] = 1.0
    return x


@pytest.mark.parametrize("kind", ["multvae", "multdae"])
def test_sparse_first_layer_equals_dense(kind: str) -> None:
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default(kind, 40)).eval()
    x = SparseRows.from_csr(_batch())
    dense = F.normalize(x.to_dense(), dim=1)
    expected = dense @ model.input_weight + model.input_bias
    got = model._first_layer(x, dropout=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_input_dropout_matches_dense_dropout_on_nonzeros() -> None:
    # With the same survivors, the sparse path equals dense dropout(normalize(x)) @ W.
    torch.manual_seed(1)
    model = MultVAE(ModelConfig.default("multvae", 40))
    x = SparseRows.from_csr(_batch())
    torch.manual_seed(7)
    got = model._first_layer(x, dropout=0.5)
    torch.manual_seed(7)
    keep = (torch.rand(x.values.shape) >= 0.5).float()
    dense = torch.zeros(x.batch_size, 40)
    normed = F.normalize(x.to_dense(), dim=1)[x.rows, x.indices]
    dense[x.rows, x.indices] = normed * keep * 2.0
    torch.testing.assert_close(got, dense @ model.input_weight + model.input_bias)


@pytest.mark.parametrize("likelihood", ["multinomial", "gaussian", "logistic"])
def test_likelihoods_match_dense_formulas(likelihood: str) -> None:
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", 40, likelihood=likelihood))
    x = SparseRows.from_csr(_batch())
    logits = torch.randn(x.batch_size, 40)
    d = x.to_dense()
    if likelihood == "multinomial":
        expected = -(F.log_softmax(logits, 1) * d).sum(1).mean()  # Eq. 2
    elif likelihood == "gaussian":
        c = torch.where(d > 0, 10.0, 1.0)
        expected = (c / 2 * (d - logits) ** 2).sum(1).mean()  # Eq. 3
    else:
        expected = -(d * F.logsigmoid(logits) + (1 - d) * F.logsigmoid(-logits)).sum(1).mean()
    torch.testing.assert_close(model.neg_log_likelihood(logits, x), expected)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    mu, logvar = torch.zeros(3, 5), torch.zeros(3, 5)
    assert MultVAE.kl_divergence(mu, logvar).item() == 0.0
    assert MultVAE.kl_divergence(mu + 1, logvar).item() == pytest.approx(2.5)


def test_architecture_follows_the_paper() -> None:
    vae = MultVAE(ModelConfig.default("multvae", 1000))
    assert vae.input_weight.shape == (1000, 600)
    assert [tuple(layer.weight.shape) for layer in vae.encoder] == [(400, 600)]  # mean and logvar
    assert [tuple(layer.weight.shape) for layer in vae.decoder] == [(600, 200), (1000, 600)]
    dae = MultVAE(ModelConfig.default("multdae", 1000))
    assert dae.input_weight.shape == (1000, 200)
    assert [tuple(layer.weight.shape) for layer in dae.decoder] == [(1000, 200)]
    bound = np.sqrt(6 / (1000 + 600))  # Glorot uniform
    assert vae.input_weight.abs().max().item() <= bound
    assert vae.input_bias.abs().max().item() <= 0.002  # truncated normal, std 0.001


def test_vae_samples_in_training_and_uses_the_mean_in_eval() -> None:
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", 40))
    x = SparseRows.from_csr(_batch())
    model.eval()
    a, mu, _ = model(x)
    torch.testing.assert_close(a, model.decode(mu))
    model.train()
    b, _, _ = model(x)
    c, _, _ = model(x)
    assert not torch.allclose(b, c)


def test_config_round_trip_and_validation() -> None:
    config = ModelConfig.default("multvae", 77, likelihood="logistic")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="q_dims"):
        ModelConfig(p_dims=(200, 600, 50), q_dims=(60, 600, 200))
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig.default("multvae", 10, dropout=1.0)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_sparse_first_layer_gradient_equals_dense(sparse_grad: bool) -> None:
    # sparse_grad: the gradient as a sparse tensor over the clicked rows (SparseAdam's input).
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", 40))
    x = SparseRows.from_csr(_batch())
    upstream = torch.randn(x.batch_size, 600)
    (model._first_layer(x, dropout=0.0, sparse_grad=sparse_grad) * upstream).sum().backward()
    grad = model.input_weight.grad
    assert grad is not None
    assert grad.is_sparse == sparse_grad
    if sparse_grad:
        assert set(grad.coalesce().indices()[0].tolist()) == set(x.indices.tolist())
        grad = grad.to_dense()
    got = grad.clone()
    model.input_weight.grad = None
    dense = F.normalize(x.to_dense(), dim=1)
    ((dense @ model.input_weight + model.input_bias) * upstream).sum().backward()
    torch.testing.assert_close(got, model.input_weight.grad, rtol=1e-5, atol=1e-6)
