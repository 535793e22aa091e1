"""compare_versions: columns mapped through item ids, the same users, a paired test per metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from multvae.artifacts import VERSIONS, write_version
from multvae.errors import DataError
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE
from training.compare import compare_versions
from training.dataset import HeldOut
from training.evaluate import save_heldout

SHARED = [f"i{j}" for j in range(12)]


def model_for(n_items: int, seed: int = 0) -> MultVAE:
    torch.manual_seed(seed)
    return MultVAE(ModelConfig(kind="multvae", p_dims=(4, 8, n_items))).eval()


def heldout(users: list[tuple[str, list[str], list[str]]], ids: list[str]) -> HeldOut:
    """Rows of (user id, fold-in item ids, target item ids) over the columns ``ids``."""
    col = {item: c for c, item in enumerate(ids)}

    def matrix(part: int) -> sp.csr_matrix:
        rows = [[col[i] for i in u[part]] for u in users]
        indptr = np.cumsum([0] + [len(r) for r in rows])
        indices = np.asarray([c for r in rows for c in r], dtype=np.int64)
        data = np.ones(len(indices), np.float32)
        return sp.csr_matrix((data, indices, indptr), (len(users), len(ids)))

    return HeldOut(matrix(1), matrix(2), np.asarray([u[0] for u in users]))


def write(
    model_dir: Path, model: MultVAE, ids: list[str], users: list[tuple[str, list[str], list[str]]]
) -> Path:
    items = ItemIndex.build(ids, np.ones(len(ids), dtype=np.int64))
    held = heldout(users, ids)
    version = write_version(
        model_dir,
        model,
        items,
        {},
        write_extra=lambda d: save_heldout(d / "heldout.npz", held, held),
    )
    return model_dir / VERSIONS / version


def sample_users(seed: int = 0, n: int = 20) -> list[tuple[str, list[str], list[str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        picked = [SHARED[j] for j in rng.permutation(12)[:6]]
        out.append((f"u{u}", picked[:4], picked[4:]))
    return out


def test_same_model_in_another_column_order_compares_equal(tmp_path: Path) -> None:
    # A knows SHARED + "old"; B knows SHARED in another order + "new". A favours its extra
    # item with a huge output bias, B shuns its own: were they ranked, the metrics would differ.
    ids_a = [*SHARED, "old"]
    a = model_for(13)
    with torch.no_grad():
        a.decoder[-1].bias[12] = 100.0
    perm = np.random.default_rng(5).permutation(12)  # B's column c holds SHARED[perm[c]]
    ids_b = [SHARED[p] for p in perm] + ["new"]
    b = model_for(13, seed=1)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    index = torch.as_tensor(np.r_[perm, 12])
    state["input_weight"] = state["input_weight"][index]
    last = f"decoder.{len(a.decoder) - 1}"
    state[f"{last}.weight"] = state[f"{last}.weight"][index]
    state[f"{last}.bias"] = state[f"{last}.bias"][index]
    state[f"{last}.bias"][12] = -100.0
    b.load_state_dict(state)

    users = sample_users()
    only_a = [("u-a-only", SHARED[:4], SHARED[4:6])]
    old_target = [("u-old", SHARED[:4], ["old"])]
    dir_a = write(tmp_path / "a", a, ids_a, users + only_a + old_target)
    dir_b = write(tmp_path / "b", b, ids_b, [*users, ("u-old", SHARED[:4], SHARED[4:5])])

    result = compare_versions(dir_a, tmp_path / "b")  # a version dir, or a model dir's CURRENT
    assert result.n_users == len(users)
    assert result.users_dropped == {
        "not_held_out_by_b": 1,
        "no_common_fold_in": 0,
        "no_common_target": 1,
    }
    assert result.items == {"common": 12, "only_a": 1, "only_b": 1}
    for metric, values in result.a.per_user.items():
        np.testing.assert_allclose(result.b.per_user[metric], values)
        assert result.tests[metric].p == 1.0
    assert not result.regressed()
    assert result.version_a == dir_a.name
    assert result.version_b == dir_b.name
    json.dumps(result.to_json(), allow_nan=False)
    assert "20 test users held out by both" in result.format()


def test_a_better_candidate_is_significant_and_a_worse_one_regresses(tmp_path: Path) -> None:
    # Every user's targets are i0 and i1; the candidate boosts exactly those two items.
    rng = np.random.default_rng(3)
    users = []
    for u in range(30):
        fold = [SHARED[j] for j in rng.permutation(np.arange(2, 12))[:4]]
        users.append((f"u{u}", fold, ["i0", "i1"]))
    served = model_for(12)
    candidate = model_for(12)
    with torch.no_grad():
        candidate.decoder[-1].bias[:2] += 50.0
    dir_a = write(tmp_path / "served", served, SHARED, users)
    dir_b = write(tmp_path / "candidate", candidate, SHARED, users)

    better = compare_versions(dir_a, dir_b)
    ndcg = better.tests["ndcg@100"]
    assert ndcg.diff > 0
    assert better.b.per_user["ndcg@100"] == pytest.approx(1.0)
    assert ndcg.p < 0.001
    assert not better.regressed()
    assert better.to_json()["tests"]["ndcg@100"]["mean_b"] == pytest.approx(1.0)

    worse = compare_versions(dir_b, dir_a)
    assert worse.regressed()
    assert not worse.regressed(tolerance=1.0)  # within tolerance: not a regression


def test_versions_without_common_test_users_are_refused(tmp_path: Path) -> None:
    model = model_for(12)
    dir_a = write(tmp_path / "a", model, SHARED, sample_users())
    renamed = [(f"other-{u}", f, t) for u, f, t in sample_users()]
    dir_b = write(tmp_path / "b", model, SHARED, renamed)
    with pytest.raises(DataError, match=r"only 0 of version .* 20 test users can be compared"):
        compare_versions(dir_a, dir_b)


def test_compare_command_exit_code_is_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from multvae_cli import main

    users = [(f"u{u}", [SHARED[2 + u % 10]], ["i0", "i1"]) for u in range(30)]
    served, candidate = model_for(12), model_for(12)
    with torch.no_grad():
        served.decoder[-1].bias[:2] += 50.0  # the served model ranks every target first
    dir_a = write(tmp_path / "served", served, SHARED, users)
    dir_b = write(tmp_path / "candidate", candidate, SHARED, users)

    assert main(["compare", str(dir_a), str(dir_b)]) == 0  # reports, does not gate
    assert "REGRESSED" in capsys.readouterr().out
    assert main(["compare", str(dir_a), str(dir_b), "--fail-on-regression"]) == 3
    capsys.readouterr()
    assert main(["compare", str(dir_b), str(dir_a), "--fail-on-regression", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["regressed"] is False
    assert out["tests"]["ndcg@100"]["diff_b_minus_a"] > 0
