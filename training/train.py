"""The training loop: beta-annealed ELBO (Mult-VAE^PR) or penalised likelihood (Mult-DAE).

Training state (update counter, beta schedule, best epoch) lives here, not in the model.
Validation NDCG@100 is computed every epoch through the same fold-in code the service uses,
and the weights of the best epoch are kept.

Two regimes:

* ``TrainConfig.paper()`` reproduces Section 4.3 exactly: batch 500, beta = min(cap, step /
  200,000), a fixed number of epochs, no early stopping.
* The default adapts to the data: training is counted in updates (at least
  ``min_updates``, at least ``min_epochs``), batches of at most 500 users are split evenly,
  the anneal schedule is scaled so beta reaches its cap at ``anneal_fraction`` of the planned
  updates, the architecture follows the data size (see :func:`plan`), and training stops when
  validation NDCG@100 has not improved for ``patience`` epochs.

Either runs in one process or as one rank of a torchrun job (:mod:`training.distributed`:
each rank trains its shard of every global batch, the validation sums are all-reduced) and
can checkpoint every epoch and resume (:mod:`training.checkpoint`). Each epoch seeds its
random streams from (seed, epoch, rank) (:func:`epoch_seed`), so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm import tqdm

from multvae.device import resolve_device
from multvae.errors import TrainingError
from multvae.model import Likelihood, ModelConfig, ModelKind, MultVAE, SparseRows
from multvae.ranking import ndcg_at_k
from multvae.recommend import rank_rows
from training import checkpoint
from training.checkpoint import Checkpointing
from training.dataset import HeldOut, Split
from training.distributed import Group
from training.itempath import fit_item_path
from training.sampled import SampledSoftmax
from training.sampled import optimisers as sampled_optimisers

AnnealCap = float | Literal["auto", "auto-single"]
# Below this many training users the default kind is Mult-DAE [I -> 200 -> I], from it
# Mult-VAE [I -> 600 -> 200 -> 600 -> I] (bench/RESULTS.md, "issue 9").
SMALL_DATA_USERS = 10_000
RECVAE_HIDDEN = (600,) * 5  # Shenbin et al.'s encoder: five densely connected layers of 600
ITEM_NEIGHBOURS = 1024  # per item in the item-item path (bench/RESULTS.md, "The item-item path")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; ``None`` means "derive from the data" (see module doc)."""

    model: ModelKind | Literal["auto"] = "auto"  # auto: see plan()
    likelihood: Likelihood = "multinomial"
    hidden_dims: tuple[int, ...] | None = None  # None: by data size, see plan()
    latent_dim: int = 200
    dropout: float = 0.5
    lr: float = 1e-3
    batch_size: int | None = None
    epochs: int | None = None  # None: enough epochs for min_updates, within min/max_epochs
    min_epochs: int = 100
    max_epochs: int = 1000
    min_updates: int = 2000
    anneal_cap: AnnealCap = 0.2
    total_anneal_steps: int | None = None
    anneal_fraction: float = 0.5
    weight_decay: float | None = None  # None: 0.01 for the DAE, 0 for the VAE (paper)
    patience: int | Literal["auto"] | None = "auto"  # auto: an eighth of the epochs, >= 20
    seed: int = 98765
    device: str = "auto"
    # RecVAE (model="recvae"): beta_u = gamma * |x_u|; each epoch is encoder_epochs passes
    # updating the encoder (input dropout on), the prior refresh, then one decoder pass.
    gamma: float = 0.005
    encoder_epochs: int = 3
    # Sampled softmax (training.sampled): this many items drawn per batch estimate the
    # multinomial's normaliser; None = the full softmax over every item (the paper's).
    sampled_softmax: int | None = None
    # The item-item path (training.itempath): each item's this many strongest EASE weights,
    # added to the logits with a weight chosen on the validation users; 0 = the network alone.
    item_neighbours: int = ITEM_NEIGHBOURS

    @classmethod
    def paper(
        cls, model: ModelKind = "multvae", epochs: int = 200, **overrides: Any
    ) -> TrainConfig:
        """Section 4.3 verbatim, every knob pinned (no default may drift into it): Mult-VAE
        [I -> 600 -> 200 -> 600 -> I], tanh, input dropout 0.5, Adam 1e-3, batch 500, beta
        annealed over 200,000 updates to a cap of 0.2, a fixed number of epochs, no early
        stopping; Mult-DAE [I -> 200 -> I] with L2 weight 0.01."""
        fields: dict[str, Any] = {
            "model": model,
            "likelihood": "multinomial",
            "hidden_dims": (600,) if model == "multvae" else None,
            "latent_dim": 200,
            "dropout": 0.5,
            "lr": 1e-3,
            "batch_size": 500,
            "epochs": epochs,
            "anneal_cap": 0.2,
            "total_anneal_steps": 200_000,
            "patience": None,
            "min_updates": 0,
            "item_neighbours": 0,
        }
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """The concrete schedule a config resolves to on a given training set."""

    model: ModelKind
    hidden_dims: tuple[int, ...]
    batch_size: int
    epochs: int
    batches_per_epoch: int
    total_anneal_steps: int
    weight_decay: float
    patience: int | None

    @property
    def updates(self) -> int:
        return self.epochs * self.batches_per_epoch


def plan(config: TrainConfig, n_train_users: int) -> Plan:
    """Resolve architecture, batch size, epochs, anneal length and patience for the data.

    Without explicit settings the VAE gets the paper's [I -> 600 -> 200 -> 600 -> I] from
    10,000 training users up and the log-linear [I -> 200 -> I] below (the paper's choice for
    its smaller datasets, and measurably better on ML-100K and ml-latest-small: see
    bench/RESULTS.md); the DAE always gets [I -> 200 -> I].
    """
    if n_train_users < 1:
        raise TrainingError("the split has no training users")
    model: ModelKind = config.model if config.model != "auto" else (
        "multvae" if n_train_users >= SMALL_DATA_USERS else "multdae"
    )
    if config.batch_size is not None:
        batch = min(config.batch_size, n_train_users)
    else:
        # At most the paper's 500 users, split evenly so no epoch ends on a runt batch.
        batch = math.ceil(n_train_users / math.ceil(n_train_users / 500))
    per_epoch = math.ceil(n_train_users / batch)
    if model == "recvae":
        per_epoch *= config.encoder_epochs + 1  # encoder passes, then a decoder pass
    wanted = max(config.min_epochs, math.ceil(config.min_updates / per_epoch))
    epochs = config.epochs or max(1, min(config.max_epochs, wanted))
    # beta = step / total_anneal_steps reaches the cap at anneal_fraction of the planned updates
    cap = config.anneal_cap if isinstance(config.anneal_cap, float | int) else 1.0
    reach = config.anneal_fraction * epochs * per_epoch
    anneal = config.total_anneal_steps or max(1, round(reach / max(float(cap), 1e-6)))
    decay = (
        config.weight_decay
        if config.weight_decay is not None
        else (0.01 if model == "multdae" else 0.0)
    )
    hidden = config.hidden_dims
    if hidden is None and model == "recvae":
        hidden = RECVAE_HIDDEN
    elif hidden is None:
        hidden = (600,) if model == "multvae" and n_train_users >= SMALL_DATA_USERS else ()
    patience = config.patience
    if patience == "auto":
        patience = max(20, epochs // 8)
    return Plan(model, tuple(hidden), batch, epochs, per_epoch, anneal, decay, patience)


@dataclass
class BetaSchedule:
    """beta = min(cap, step / total_steps), optionally frozen once validation stops improving.

    ``freeze_on_drop`` is the paper's single-run variant (Section 2.2.2): the first epoch whose
    validation NDCG@100 is no better than the best so far fixes beta at the best epoch's value.
    """

    cap: float
    total_steps: int
    freeze_on_drop: bool = False
    frozen: float | None = None

    def __call__(self, step: int) -> float:
        beta = min(self.cap, step / self.total_steps)
        return beta if self.frozen is None else min(beta, self.frozen)

    def observe(self, improved: bool, best_beta: float) -> None:
        if self.freeze_on_drop and not improved and self.frozen is None:
            self.frozen = best_beta


@dataclass
class EpochRecord:
    epoch: int
    updates: int
    loss: float
    beta: float
    val_ndcg_at_100: float
    seconds: float
    users_per_s: float


@dataclass
class TrainResult:
    model: MultVAE
    best_epoch: int
    best_val_ndcg: float
    beta: float  # beta at the best epoch (the "anneal cap" the paper would report)
    plan: Plan
    history: list[EpochRecord] = field(default_factory=list)
    anneal_search: list[EpochRecord] = field(default_factory=list)  # first run of cap="auto"
    seconds: float = 0.0
    item_path: dict[str, Any] | None = None  # training.itempath's summary, where it ran


def _batches(x: sp.csr_matrix, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(x.shape[0])
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The torch seed of one epoch on one rank (dropout masks, reparameterisation noise).

    A function of (seed, epoch, rank) alone: a resumed run draws what an uninterrupted one
    would without any saved random state, and ranks draw different masks for their users.
    """
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0])


def validation_sum(
    model: MultVAE, heldout: HeldOut, group: Group | None = None
) -> tuple[float, int]:
    """(sum of NDCG@100, users) over this rank's share of the validation users (all of them in
    one process), fold-in masked, via the serving fold-in path."""
    model.eval()
    fold_in, targets = heldout.fold_in, heldout.targets
    if group is not None and group.distributed:
        rows = np.array_split(np.arange(heldout.n_users), group.world)[group.rank]
        if not len(rows):
            return 0.0, 0
        fold_in, targets = fold_in[rows], targets[rows]
    ndcg = ndcg_at_k(rank_rows(model, fold_in, 100), targets, 100)
    return float(ndcg.sum()), len(ndcg)


def model_config_for(config: TrainConfig, sched: Plan, n_items: int) -> ModelConfig:
    """The architecture a training config and plan resolve to for ``n_items`` items."""
    if sched.model == "recvae":
        if not sched.hidden_dims:
            raise TrainingError("RecVAE needs at least one hidden layer (--hidden-dims 600)")
        width = sched.hidden_dims[0]
        return ModelConfig(
            kind="recvae",
            p_dims=(config.latent_dim, n_items),
            q_dims=(n_items, *(width,) * len(sched.hidden_dims), config.latent_dim),
            dropout=config.dropout,
            likelihood=config.likelihood,
        )
    return ModelConfig(
        kind=sched.model,
        p_dims=(config.latent_dim, *sched.hidden_dims, n_items),
        dropout=config.dropout,
        likelihood=config.likelihood,
    )


class RecVAESteps:
    """One RecVAE epoch (Shenbin et al., Algorithm 1): encoder passes, prior refresh, decoder.

    The encoder (its own Adam) is trained on the ELBO with input dropout and a per-user KL
    weight gamma * |x_u| against the composite prior, whose middle component is the encoder as
    it was before this epoch; then one pass trains the decoder (its own Adam) on the
    likelihood alone, with z sampled from the dropout-free encoder.
    """

    def __init__(self, model: MultVAE, config: TrainConfig, sched: Plan) -> None:
        self.model, self.config = model, config
        encoder = model.encoder_parameters()
        ids = {id(p) for p in encoder}
        decoder = [p for p in model.parameters() if id(p) not in ids]
        # The same L2 scale as the other kinds' penalty: gradient 2 * weight_decay / batch * w.
        decay = 2 * sched.weight_decay / sched.batch_size
        self.encoder_opt = torch.optim.Adam(encoder, lr=config.lr, weight_decay=decay)
        self.decoder_opt = torch.optim.Adam(decoder, lr=config.lr, weight_decay=decay)
        self.old_encoder = self._frozen_copy()

    @property
    def optimisers(self) -> list[torch.optim.Optimizer]:
        return [self.encoder_opt, self.decoder_opt]

    def _frozen_copy(self) -> MultVAE:
        old = copy.deepcopy(self.model).eval()
        old.requires_grad_(False)
        return old

    def _step(self, optimiser: torch.optim.Optimizer, loss: Tensor, epoch: int) -> float:
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at epoch {epoch} (lr {self.config.lr}, gamma "
                f"{self.config.gamma}); nothing was written. Lower --lr or --gamma"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return float(loss.item())

    def epoch(
        self, train: sp.csr_matrix, batch: int, rng: np.random.Generator,
        device: torch.device, epoch: int,
    ) -> tuple[float, int]:
        """Run one epoch; returns (loss summed over the encoder pass users, users seen)."""
        model, total, seen = self.model, 0.0, 0
        model.train()
        for _ in range(self.config.encoder_epochs):
            for rows in _batches(train, batch, rng):
                x = SparseRows.from_csr(train[rows], device)
                mu, logvar = model.encode(x)
                assert logvar is not None
                z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                with torch.no_grad():
                    old_mu, old_logvar = self.old_encoder.encode(x)
                assert old_logvar is not None
                kl = model.composite_prior_kl(z, mu, logvar, old_mu, old_logvar)
                nll = -model.log_likelihood_rows(model.decode(z), x)
                loss = (nll + self.config.gamma * x.row_sums() * kl).mean()
                total += self._step(self.encoder_opt, loss, epoch) * len(rows)
                seen += len(rows)
        self.old_encoder = self._frozen_copy()
        for rows in _batches(train, batch, rng):
            x = SparseRows.from_csr(train[rows], device)
            with torch.no_grad():
                mu, logvar = model.encode_with_dropout(x, 0.0)
                assert logvar is not None
                z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            self._step(self.decoder_opt, model.neg_log_likelihood(model.decode(z), x), epoch)
        return total, seen


@dataclass
class RunState:
    """A run's progress between epochs: what a checkpoint restores besides the tensors."""

    cap: float
    epoch: int = 0  # epochs finished
    updates: int = 0
    best: float = -1.0
    best_epoch: int = 0
    best_beta: float = 0.0
    stale: int = 0  # epochs since the best one
    frozen: float | None = None  # BetaSchedule.frozen
    seconds: float = 0.0
    history: list[EpochRecord] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        fields = dict(data)
        fields["history"] = [EpochRecord(**r) for r in fields["history"]]
        return cls(**fields)


@dataclass
class Resumed:
    """A checkpoint as every rank sees it: rank 0 alone holds the model weights (the others
    receive them from DistributedDataParallel, which broadcasts rank 0's at wrapping)."""

    phase: str  # "search": the first run of anneal_cap="auto"; "final": the only or second
    run: RunState
    optimisers: list[dict[str, Any]]
    search: list[EpochRecord]
    search_seconds: float
    model: dict[str, Tensor] | None = None
    best_model: dict[str, Tensor] | None = None
    old_encoder: dict[str, Tensor] | None = None


def _resume_point(checkpointing: Checkpointing | None, group: Group) -> Resumed | None:
    """Rank 0 reads the checkpoint; every rank gets its schedule and optimiser state, or the
    same TrainingError."""
    state: dict[str, Any] | None = None
    error = None
    if group.leader and checkpointing is not None:
        try:
            state = checkpoint.load(checkpointing)
        except TrainingError as exc:
            error = str(exc)
    weights = ("model", "best_model", "old_encoder")
    shared = None if state is None else {k: v for k, v in state.items() if k not in weights}
    error, shared = group.from_leader((error, shared))
    if error is not None:
        raise TrainingError(error)
    if shared is None:
        return None
    mine = state if state is not None else {}
    return Resumed(
        shared["phase"], RunState.from_dict(shared["run"]), shared["optimisers"],
        [EpochRecord(**r) for r in shared["search"]], shared["search_seconds"],
        mine.get("model"), mine.get("best_model"), mine.get("old_encoder"),
    )  # fmt: skip


@dataclass
class _Loop:
    """The epochs of one run (or of each of anneal_cap="auto"'s two), on one rank."""

    split: Split
    config: TrainConfig
    sched: Plan
    group: Group
    progress: bool
    on_epoch: Callable[[EpochRecord], None] | None
    checkpointing: Checkpointing | None
    sampled: SampledSoftmax | None = None  # None: the full softmax (the paper's)

    def run(
        self,
        cap: float,
        freeze_on_drop: bool,
        phase: str,
        resumed: Resumed | None,
        search: tuple[list[EpochRecord], float] = ([], 0.0),
    ) -> TrainResult:
        config, sched, group, device = self.config, self.sched, self.group, self.group.device
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = MultVAE(model_config_for(config, sched, self.split.n_items)).to(device)
        recvae = RecVAESteps(model, config, sched) if sched.model == "recvae" else None
        if recvae is not None:
            optimisers = recvae.optimisers
        elif self.sampled is not None:  # lazy Adam for the two I-row tables (training.sampled)
            optimisers = sampled_optimisers(model, config.lr)
        else:
            optimisers = [torch.optim.Adam(model.parameters(), lr=config.lr)]
        state, best_state = RunState(cap), {}
        if resumed is not None:
            if len(resumed.optimisers) != len(optimisers):
                raise TrainingError(
                    f"the checkpoint holds {len(resumed.optimisers)} optimiser states and this "
                    f"run has {len(optimisers)} optimisers (an older multvae wrote it): delete "
                    f"{self.checkpointing.path if self.checkpointing else 'it'} to train from "
                    "the start"
                )
            state = resumed.run
            if resumed.model is not None:
                model.load_state_dict(resumed.model)
            best_state = resumed.best_model or {}
            for optimiser, saved in zip(optimisers, resumed.optimisers, strict=True):
                optimiser.load_state_dict(saved)
            if recvae is not None and resumed.old_encoder is not None:
                recvae.old_encoder.load_state_dict(resumed.old_encoder)
        net = group.wrap(model)
        schedule = BetaSchedule(state.cap, sched.total_anneal_steps, freeze_on_drop, state.frozen)
        train = sp.csr_matrix(self.split.train, dtype=np.float32)
        bar = tqdm(
            total=sched.epochs, initial=state.epoch, unit="epoch",
            disable=not (self.progress and group.leader),
        )  # fmt: skip
        while state.epoch < sched.epochs and not self._stopped(state):
            epoch = state.epoch + 1
            torch.manual_seed(epoch_seed(config.seed, epoch, group.rank))
            rng = np.random.default_rng([config.seed, epoch])
            tic = time.perf_counter()
            net.train()
            beta = 0.0
            if recvae is not None:
                total, n_seen = recvae.epoch(train, sched.batch_size, rng, device, epoch)
                state.updates += sched.batches_per_epoch
            else:
                total, n_seen, beta = self._epoch(net, model, optimisers, train, rng,
                                                  schedule, state, epoch)  # fmt: skip
            seconds = time.perf_counter() - tic
            # Losses and validation NDCG@100 summed over the ranks: the same numbers, hence
            # the same best epoch and the same early stop, on every rank.
            loss_sum, users, val_sum, val_users = group.sum(
                [total, n_seen, *validation_sum(model, self.split.validation, group)]
            )
            ndcg = val_sum / val_users
            record = EpochRecord(
                epoch, state.updates, loss_sum / users, beta, ndcg, seconds,
                users / max(seconds, 1e-9),
            )  # fmt: skip
            state.history.append(record)
            if ndcg > state.best:
                state.best, state.best_epoch, state.best_beta, state.stale = ndcg, epoch, beta, 0
                if group.leader:  # the only rank that writes the result
                    best_state = copy.deepcopy(model.state_dict())
            else:
                state.stale += 1
            schedule.observe(state.best_epoch == epoch, state.best_beta)
            state.frozen, state.epoch = schedule.frozen, epoch
            state.seconds += time.perf_counter() - tic
            if self.checkpointing is not None and group.leader:
                checkpoint.save(self.checkpointing.path, {
                    "format": checkpoint.FORMAT, "identity": self.checkpointing.identity,
                    "phase": phase, "run": asdict(state),
                    "search": [asdict(r) for r in search[0]], "search_seconds": search[1],
                    "model": model.state_dict(), "best_model": best_state,
                    "optimisers": [o.state_dict() for o in optimisers],
                    "old_encoder": None if recvae is None else recvae.old_encoder.state_dict(),
                })  # fmt: skip
            if self.on_epoch is not None:
                self.on_epoch(record)
            bar.set_postfix(
                loss=f"{record.loss:.2f}", beta=f"{beta:.3f}", ndcg=f"{ndcg:.4f}",
                users_s=f"{record.users_per_s:.0f}",
            )  # fmt: skip
            bar.update(1)
        if self._stopped(state):
            # The bar ends full at the epochs that ran, not at "400/1000".
            bar.total = state.epoch
            bar.set_description(f"stopped early ({sched.patience} epochs without gain)")
        bar.close()
        if best_state:
            model.load_state_dict(best_state)
        model.eval()
        return TrainResult(
            model, state.best_epoch, state.best, state.best_beta, sched, state.history,
            seconds=state.seconds,
        )  # fmt: skip

    def _stopped(self, state: RunState) -> bool:
        return self.sched.patience is not None and state.stale >= self.sched.patience

    def _epoch(
        self, net: torch.nn.Module, model: MultVAE, optimisers: list[torch.optim.Optimizer],
        train: sp.csr_matrix, rng: np.random.Generator, schedule: BetaSchedule,
        state: RunState, epoch: int,
    ) -> tuple[float, int, float]:
        """One pass of Mult-VAE / Mult-DAE updates; (loss summed over users, users, last beta).

        Each rank trains on its shard of every global batch, its mean loss weighted by its
        share, so the all-reduced gradient is the gradient of the whole batch's mean loss.
        """
        sched, config = self.sched, self.config
        lam = sched.weight_decay / sched.batch_size  # the reference's L2 scale for the DAE
        total, n_seen, beta = 0.0, 0, 0.0
        for rows in _batches(train, sched.batch_size, rng):
            mine, weight = self.group.shard(rows)
            x = SparseRows.from_csr(train[mine], self.group.device)
            if sched.model == "multvae":
                beta = schedule(state.updates)
            if self.sampled is not None:  # one process only: train() refuses it under torchrun
                # The L2 penalty (lam) of the rows the batch touched (training.sampled).
                loss, mu, logvar = self.sampled(model, x, lam)
            else:
                logits, mu, logvar = net(x)
                loss = model.neg_log_likelihood(logits, x)
            if logvar is not None:
                loss = loss + beta * model.kl_divergence(mu, logvar)
            if lam > 0 and self.sampled is None:
                loss = loss + 2 * lam * 0.5 * model.l2_penalty()  # 2 * tf l2_regularizer(lam)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch}, update {state.updates + 1} "
                    f"(beta {beta:.4f}, lr {config.lr}); nothing was written. Lower --lr or "
                    "check the input for extreme values"
                )
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            (loss * weight).backward()
            for optimiser in optimisers:
                optimiser.step()
            state.updates += 1
            if weight > 0:
                total += loss.item() * len(mine)
                n_seen += len(mine)
        return total, n_seen, beta


def train(
    split: Split,
    config: TrainConfig,
    *,
    progress: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    group: Group | None = None,
    checkpointing: Checkpointing | None = None,
) -> TrainResult:
    """Train on ``split.train``, select the epoch by validation NDCG@100, return the best model.

    ``group``: this process's rank in a torchrun job (default: the only process, on
    ``config.device``); every rank calls this with the same split, and rank 0's result holds
    the best epoch's weights (the other ranks' the last epoch's). ``checkpointing``: where to
    checkpoint each epoch and whether to continue that checkpoint (see training.checkpoint).
    """
    if split.validation.n_users == 0:
        raise TrainingError("the split has no validation users with held-out items")
    group = group or Group(device=resolve_device(config.device))
    sched = plan(config, split.train.shape[0])
    if sched.model == "recvae" and group.distributed:
        raise TrainingError(
            "RecVAE trains in one process (its alternating encoder and decoder passes are not "
            "data-parallel): run it without torchrun, or train multvae or multdae"
        )
    if config.sampled_softmax is not None:
        if config.sampled_softmax < 1:
            raise TrainingError(
                f"--sampled-softmax needs >= 1 sampled item per batch, got "
                f"{config.sampled_softmax}"
            )
        if sched.model == "recvae" or config.likelihood != "multinomial":
            raise TrainingError(
                "the sampled softmax estimates the multinomial likelihood of Mult-VAE or "
                f"Mult-DAE; it does not apply to model {sched.model} with likelihood "
                f"{config.likelihood} (drop --sampled-softmax, or use --model multvae|multdae "
                "--likelihood multinomial)"
            )
        if group.distributed:
            raise TrainingError(
                "--sampled-softmax trains in one process (its gathered output rows bypass "
                "DistributedDataParallel's gradient averaging): run it without torchrun"
            )
    cap = config.anneal_cap
    if not (cap in ("auto", "auto-single") or (
        isinstance(cap, float | int) and 0.0 <= float(cap) <= 1.0
    )):  # fmt: skip
        raise TrainingError(f"anneal cap must be in [0, 1], 'auto' or 'auto-single', got {cap!r}")
    resumed = _resume_point(checkpointing, group)
    sampled = None
    if config.sampled_softmax is not None:
        sampled = SampledSoftmax.from_clicks(split.train, config.sampled_softmax, group.device)
    loop = _Loop(split, config, sched, group, progress, on_epoch, checkpointing, sampled)
    if cap == "auto":
        # Section 2.2.2: anneal towards 1, note beta at the validation peak, retrain to it.
        if resumed is None or resumed.phase == "search":
            search = loop.run(1.0, False, "search", resumed)
            found, history, seconds = search.beta, search.history, search.seconds
            resumed = None
        else:
            found, history, seconds = resumed.run.cap, resumed.search, resumed.search_seconds
        result = loop.run(found, False, "final", resumed, (history, seconds))
        result.anneal_search = history
        result.seconds += seconds
    elif cap == "auto-single":
        result = loop.run(1.0, True, "final", resumed)
    else:
        result = loop.run(float(cap), False, "final", resumed)
    if config.item_neighbours and group.leader:  # the leader holds the best epoch's weights
        tic = time.perf_counter()
        result.model, result.item_path = fit_item_path(result.model, split,
                                                       config.item_neighbours)  # fmt: skip
        result.seconds += time.perf_counter() - tic
    return result
