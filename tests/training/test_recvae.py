"""RecVAE (``--model recvae``): learns a known answer, folds in and serves like Mult-VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from multvae.artifacts import load_version
from multvae.model import ModelConfig, MultVAE, SparseRows
from multvae.recommend import rank_rows
from multvae_cli import main
from service.app import create_app
from service.settings import Settings
from training.dataset import Split
from training.evaluate import evaluate_model, evaluate_topk
from training.preprocess import Preprocessing, filter_interactions
from training.split import strong_generalisation_split
from training.synthetic import generate
from training.train import TrainConfig, train

FAST = {"device": "cpu", "latent_dim": 32, "hidden_dims": (64, 64), "patience": None}


@pytest.fixture(scope="module")
def split() -> Split:
    inter, _ = filter_interactions(generate("small", seed=3), Preprocessing(3.5, 5, 0))
    return strong_generalisation_split(inter, 200, seed=98765)


def _popularity_ndcg(split: Split) -> float:
    order = split.items.popularity_ranking()
    rows = []
    for u in range(split.test.n_users):
        seen = split.test.fold_in[u].indices
        rows.append(order[~np.isin(order, seen)][:100])
    return float(evaluate_topk(np.asarray(rows), split.test).summary()["ndcg@100"]["mean"])


def test_recvae_beats_popularity_by_far(split: Split) -> None:
    result = train(split, TrainConfig(model="recvae", epochs=12, **FAST))
    ours = evaluate_model(result.model, split.test).summary()["ndcg@100"]["mean"]
    assert ours > _popularity_ndcg(split) + 0.15
    # four passes per epoch: three of the encoder, one of the decoder
    per_pass = result.plan.batches_per_epoch // 4
    assert [r.updates for r in result.history[:2]] == [4 * per_pass, 8 * per_pass]
    assert result.model.config.kind == "recvae"


def test_recvae_architecture_is_dense_with_layer_norm() -> None:
    config = ModelConfig.default("recvae", 50)
    assert config.p_dims == (200, 50)
    assert config.encoder_dims == (50, *(600,) * 5, 200)
    model = MultVAE(config)
    assert len(model.norms) == 5
    assert len(model.decoder) == 1
    # the encoder's last layer emits mean and log-variance; the decoder is one K -> I layer
    assert model.encoder[-1].out_features == 400
    assert model.output_layer.in_features == 200
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    x = SparseRows.from_csr(np.eye(3, 50, dtype=np.float32))
    mu, logvar = model.eval().encode(x)
    assert mu.shape == (3, 200)
    assert logvar is not None
    assert logvar.shape == (3, 200)


def test_a_config_written_before_recvae_still_loads() -> None:
    old = {"p_dims": [200, 600, 50], "kind": "multvae", "q_dims": None, "dropout": 0.5,
           "likelihood": "multinomial", "gaussian_c0": 1.0, "gaussian_c1": 10.0}  # fmt: skip
    model = MultVAE(ModelConfig.from_dict(old))
    assert not any(k.startswith("norms") for k in model.state_dict())


@pytest.mark.parametrize(
    ("p_dims", "q_dims", "match"),
    [
        ((20, 60, 50), None, "decoder is one layer"),
        ((20, 50), (50, 20), "at least|>= 1 hidden"),
        ((20, 50), (50, 64, 32, 20), "all of one width"),
    ],
)
def test_bad_recvae_architectures_are_refused(
    p_dims: tuple[int, ...], q_dims: tuple[int, ...] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(kind="recvae", p_dims=p_dims, q_dims=q_dims)


def test_composite_prior_kl_matches_the_mixture_density() -> None:
    torch.manual_seed(0)
    z, mu, logvar, old_mu, old_logvar = (torch.randn(4, 3) for _ in range(5))
    normal = torch.distributions.Normal
    prior = (
        torch.stack(
            [
                normal(0.0, 1.0).log_prob(z).exp() * 3 / 20,
                normal(old_mu, (0.5 * old_logvar).exp()).log_prob(z).exp() * 3 / 4,
                normal(0.0, float(np.exp(5.0))).log_prob(z).exp() / 10,
            ]
        )
        .sum(0)
        .log()
    )
    expected = (normal(mu, (0.5 * logvar).exp()).log_prob(z) - prior).sum(1)
    got = MultVAE.composite_prior_kl(z, mu, logvar, old_mu, old_logvar)
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_a_recvae_version_serves_compares_and_evaluates(tmp_path: Path) -> None:
    data, models, reference = tmp_path / "r.csv", tmp_path / "models", tmp_path / "ref"
    assert main(["generate", "--shape", "small", "--out", str(data), "--seed", "1"]) == 0
    common = ["--data", str(data), "--epochs", "4", "--latent-dim", "16", "--device", "cpu",
              "--quiet", "--heldout-users", "150"]  # fmt: skip
    assert main(["train", *common, "--model", "recvae", "--hidden-dims", "32,32",
                 "--out", str(models)]) == 0  # fmt: skip
    assert main(["train", *common, "--hidden-dims", "none", "--out", str(reference)]) == 0
    version = load_version(models)
    assert version.config["model"]["kind"] == "recvae"
    assert version.config["training"]["gamma"] == 0.005
    assert main(["evaluate", str(models)]) == 0
    assert main(["compare", str(reference), str(models)]) == 0
    # The real app, with its lifespan, serves what the offline fold-in ranks.
    from training.evaluate import HELDOUT_FILE, load_heldout

    _, heldout = load_heldout(version.path / HELDOUT_FILE)
    offline = rank_rows(version.model, heldout.fold_in, 10)
    settings = Settings(
        model_dir=models, device="cpu", reload_interval_s=0, gc_freeze=False,
        torch_threads=torch.get_num_threads(),
    )  # fmt: skip
    ids = version.items.ids
    with TestClient(create_app(settings)) as client:
        for u in range(5):
            history = heldout.fold_in[u].indices
            response = client.post("/recommend", json={"items": [ids[c] for c in history], "n": 10})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_version"] == version.version
            assert [r["item"] for r in body["items"]] == [ids[c] for c in offline[u]]
