"""What a site does in a round, independent of Flower: load its data, train (with its privacy
ledger), evaluate. The ClientApp is a thin shell over :class:`SiteTrainer`; tests and the
benchmark drive it directly.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from dicomfl.common import protocol as P
from dicomfl.common.config import SiteConfig
from dicomfl.common.errors import NoTrainingData
from dicomfl.common.ingest import SiteData, ingest
from dicomfl.common.model import ModelConfig, build_model, check_model_size, load_weights
from dicomfl.common.splits import TEST, TRAIN, VAL
from dicomfl.common.augment import AugmentSettings
from dicomfl.common.fedstats import FeatureTransform, TransformedRows
from dicomfl.common.train import SplitData, TrainSettings, evaluate, load_split, train_local

from .privacy import PrivacySession, Release, effective_budget, site_account



@dataclass
class RoundPlan(P.RoundConfig):
    """What the server asks for a round (the protocol's :class:`~dicomfl.common.protocol.RoundConfig`:
    numbers and short names only), plus what the site adds to it."""

    kind: str = "train"  # which model of the run: train (the global model), local (baseline), personal
    features: "FeatureTransform | None" = None  # the run's feature standardization and drops (fedstats)


@dataclass
class Outcome:
    weights: "dict[str, np.ndarray] | None"
    metrics: dict = field(default_factory=dict)
    declined: bool = False
    lr: float = 0.0  # the learning rate the round trained with (train.lr x lr-scale)


def round_seed(seed: int, site: str, server_round: int, tag: str = "train") -> int:
    h = hashlib.sha256(f"{tag}:{seed}:{site}:{server_round}".encode()).digest()
    return int.from_bytes(h[:4], "big")


class SiteTrainer:
    """One site's training and evaluation, independent of Flower.

    Parameters
    ----------
    cfg : SiteConfig
        The site's config: its data, privacy policy and training settings.
    model_cfg : ModelConfig
        The run's model; its ``image_size``, when set, must equal ``cfg.preprocess.image_size``.
        A model past the site's ``train.max_model_parameters`` / ``train.max_model_memory_mb``
        raises ``ModelMismatch`` here, before anything is built.
    data : SiteData, optional
        Already-ingested data (simulations: lazy views of a cache, or arrays in memory); by
        default the site is ingested on first use.
    logger : logging.Logger, optional
        The site's own log (full error texts go here, never to the coordinator).
    """

    def __init__(self, cfg: SiteConfig, model_cfg: ModelConfig, data: SiteData | None = None,
                 logger: logging.Logger | None = None) -> None:
        # the model's size, from its description alone, before anything is built (ModelMismatch)
        check_model_size(model_cfg, model_cfg.image_size or cfg.preprocess.image_size, cfg.train.batch_size,
                         max_parameters=cfg.train.max_model_parameters, max_memory_mb=cfg.train.max_model_memory_mb)
        self.cfg = cfg
        self.log = logger or logging.getLogger(f"dicomfl.site.{cfg.site.name}")
        self.model_cfg = model_cfg
        self._data = data
        self._splits: dict[int, SplitData] = {}
        self._resamples: "tuple[list[np.ndarray], int] | None" = None

    @property
    def name(self) -> str:
        return self.cfg.site.name

    def data(self) -> SiteData:
        """The site's data: lazy views of its on-disk cache (ingesting first, which reuses the
        cache for unchanged files); nothing of the images is held in memory."""
        if self._data is None:
            self._data = ingest(self.cfg).data
        return self._data

    def split(self, which: int) -> SplitData:
        """One split's labelled samples: a lazy view; batches are read from disk as training and
        evaluation need them. Raises ``ModelMismatch`` when the model's image size or classes
        do not fit the site's data."""
        if which not in self._splits:
            self._splits[which] = load_split(self.data(), which, self.model_cfg.image_size, self.model_cfg.n_classes)
        return self._splits[which]

    def view(self, which: int, features: "FeatureTransform | None") -> SplitData:
        """One split with the run's feature transform applied as rows are read (none: as cached)."""
        s = self.split(which)
        if features is None or features.identity:
            return s
        return SplitData(s.images, TransformedRows(s.features, features), s.labels)

    def model(self):
        return build_model(self.model_cfg, seed=0)

    # ------------------------------------------------------------------ train
    def train(self, global_weights: "dict[str, np.ndarray]", plan: RoundPlan,
              correction: "dict[str, np.ndarray] | None" = None) -> Outcome:
        """Train from ``global_weights`` for one round of ``plan`` on the site's training split.

        ``correction`` is SCAFFOLD's ``c - c_i`` (:mod:`dicomfl.client.scaffold`), added to every
        gradient after the privacy step; it needs ``train.optimizer: sgd``.

        Under DP (the site's policy or the run's request) the round is charged to the site's
        privacy account first; if it would exceed a budget the site declines (``Outcome.declined``).
        Without DP the round is charged as a release that is not private (the account logs it).

        Returns
        -------
        Outcome
            The new weights (None when declined) and whitelisted numbers
            (:data:`~dicomfl.common.protocol.TRAIN_METRICS`).

        Raises
        ------
        NoTrainingData
            The site has no labelled training images.
        ModelMismatch
            The weights or the model's image size do not fit this site.
        """
        train = self.view(TRAIN, plan.features)
        if len(train) == 0:
            raise NoTrainingData("no labelled training images")
        t = self.cfg.train
        settings = TrainSettings(
            epochs=plan.local_epochs, max_steps=plan.local_steps, batch_size=t.batch_size, lr=t.lr * plan.lr_scale,
            weight_decay=t.weight_decay, proximal_mu=plan.proximal_mu,
            seed=round_seed(t.seed + plan.seed, self.name, plan.server_round),
            augment=AugmentSettings.of(t.augment), optimizer=t.optimizer, correction=correction,
        )
        dp_on, target, delta = effective_budget(self.cfg.privacy, plan if plan.dp else None)
        if not dp_on:  # logged as a release that is not private, then trained
            with site_account(self.cfg) as account:
                account.charge(Release(plan.kind, plan.run, plan.server_round, private=False))
            out = self._trained(train_local(self.model(), train, settings, global_weights=global_weights), len(train))
        else:
            with site_account(self.cfg) as account:  # one private round at a time per site: the budget is shared
                out = self._train_privately(account, train, settings, global_weights, plan, target, delta)
        out.lr = settings.lr
        return out

    def _trained(self, res, n: int, metrics: dict | None = None) -> Outcome:
        out = {P.NUM_EXAMPLES: float(n), **(metrics or {}), P.TRAIN_LOSS: res.loss, P.STEPS: float(res.steps),
               P.TRAIN_SECONDS: res.seconds, P.DECLINED: 0.0}
        return Outcome(weights=res.weights, metrics=out)

    def _train_privately(self, account, train: SplitData, settings: TrainSettings, global_weights, plan: RoundPlan,
                         target: float | None, delta: float) -> Outcome:
        p = self.cfg.privacy
        session = PrivacySession(account.stream(plan.run, plan.kind, accountant=p.accountant, delta=delta,
                                                target_epsilon=target, max_grad_norm=p.max_grad_norm), p)
        spent = session.ledger.spent()  # before this round's charge
        budget = session.budget(n_train=len(train), batch_size=settings.batch_size, num_rounds=plan.num_rounds,
                                local_epochs=plan.local_epochs, local_steps=plan.local_steps,
                                server_round=plan.server_round)
        ledger = session.ledger
        metrics = {P.NUM_EXAMPLES: float(len(train)), P.EPSILON: spent, P.DELTA: delta,
                   P.NOISE_MULTIPLIER: ledger.noise_multiplier if ledger.noise_multiplier is not None else float("nan"),
                   P.TARGET_EPSILON: target if target is not None else float("nan")}
        if not budget.affordable:
            self.log.warning("round %d of run %s (%s): declined to train: epsilon would reach %.3f (site total so far "
                             "%.3f; per-run cap %s, lifetime budget %s)", plan.server_round, plan.run, plan.kind,
                             budget.epsilon_after, ledger.spent_total(), target, p.lifetime_epsilon)
            metrics.update({P.DECLINED: 1.0, P.EPSILON_IF_TRAINED: budget.epsilon_after})
            return Outcome(weights=None, metrics=metrics, declined=True)
        dp, settings.class_counts = session.settings(train.labels, self.model_cfg.n_classes)
        settings.class_weights = p.class_weights == "noisy"
        res = train_local(self.model(), train, settings, dp=dp, global_weights=global_weights)
        metrics[P.EPSILON] = session.record(plan.server_round, res.history)
        self.log.info("round %d of run %s (%s): trained privately; epsilon spent by the run %.3f of %s, by the site "
                      "%.3f of %s", plan.server_round, plan.run, plan.kind, metrics[P.EPSILON], target,
                      ledger.spent_total(), p.lifetime_epsilon)
        return self._trained(res, len(train), metrics)

    # --------------------------------------------------------------- evaluate
    def evaluate(self, arrays: "dict[str, np.ndarray]", split: int = TEST,
                 features: "FeatureTransform | None" = None, replicates: int = 0) -> dict:
        """Metrics of the model with these weights on ``split`` (test: threshold from validation),
        its feature rows transformed by ``features`` (the run's standardization and drops).

        ``replicates`` > 0 (test split, binary model): also ``auroc-boot``, the AUROC on each of
        that many resamples of the test split (the same resamples for every model: see
        :meth:`test_resamples`), and ``auroc-boot-id``, the split's id. Whether they may leave the
        site is the caller's business (the handler asks ``privacy.eval_replicates``)."""
        m = self.model()
        load_weights(m, arrays)
        test = self.view(split, features)
        val = self.view(VAL, features) if split == TEST else None
        boot, split_id = self.test_resamples(replicates) if replicates and split == TEST else (None, None)
        out = evaluate(m, test, val, replicates=boot)
        if P.AUROC_REPLICATES in out:
            out[P.AUROC_REPLICATES_ID] = float(split_id)
        out[P.NUM_EXAMPLES] = float(len(test))
        return out

    def test_resamples(self, n: int) -> "tuple[list[np.ndarray], int]":
        """The first ``n`` resamples of the test split (by patient, stratified by label) and the
        split's id. They depend only on the site's name and the split (its labels and pseudonymous
        patients), never on a model or a run: :func:`dicomfl.common.stats.replicate_indices`."""
        from dicomfl.common.stats import replicate_indices, split_seed

        have = self._resamples
        if have is None or len(have[0]) < n:
            data = self.data()
            idx = data.subset(TEST)
            labels = self.split(TEST).labels
            groups = [data.patients[i] for i in idx]
            seed, split_id = split_seed(self.name, labels, groups)
            have = self._resamples = (replicate_indices(labels, groups, n, seed), split_id)
        return have[0][:n], have[1]
