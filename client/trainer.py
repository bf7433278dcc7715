"""What a site does in a round, independent of Flower: load its data, train (with its privacy
ledger), evaluate. The ClientApp is a thin shell over :class:`SiteTrainer`; tests and the
benchmark drive it directly.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from dicomfl.common.config import SiteConfig
from dicomfl.common.ingest import SiteData, ingest
from dicomfl.common.model import ModelConfig, build_model, load_arrays
from dicomfl.common.splits import TEST, TRAIN, VAL
from dicomfl.common.train import Arrays, DPSettings, TrainSettings, evaluate, split_arrays, train_local

from .privacy import (
    Ledger,
    count_release,
    effective_budget,
    noisy_counts,
    plan_noise,
    planned_steps,
    sample_rate,
    steps_per_epoch,
)



@dataclass
class RoundPlan:
    """What the server asks for a round (numbers and short names only)."""

    run: str = "run"
    server_round: int = 1
    num_rounds: int = 1
    local_epochs: int = 1
    local_steps: int | None = None
    proximal_mu: float = 0.0
    dp: bool = False
    target_epsilon: float | None = None
    delta: float = 1e-5
    seed: int = 0


@dataclass
class Outcome:
    arrays: "dict[str, np.ndarray] | None"
    metrics: dict = field(default_factory=dict)
    declined: bool = False


def round_seed(seed: int, site: str, server_round: int, tag: str = "train") -> int:
    h = hashlib.sha256(f"{tag}:{seed}:{site}:{server_round}".encode()).digest()
    return int.from_bytes(h[:4], "big")


class SiteTrainer:
    def __init__(self, cfg: SiteConfig, model_cfg: ModelConfig, data: SiteData | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.cfg = cfg
        self.log = logger or logging.getLogger(f"dicomfl.site.{cfg.site.name}")
        self.model_cfg = model_cfg
        self._data = data
        self._splits: dict[int, Arrays] = {}

    @property
    def name(self) -> str:
        return self.cfg.site.name

    def data(self) -> SiteData:
        if self._data is None:
            self._data = ingest(self.cfg).data
        return self._data

    def split(self, which: int) -> Arrays:
        if which not in self._splits:
            self._splits[which] = split_arrays(self.data(), which, self.model_cfg.image_size)
        return self._splits[which]

    def model(self):
        return build_model(self.model_cfg, seed=0)

    # ------------------------------------------------------------------ train
    def train(self, global_arrays: "dict[str, np.ndarray]", plan: RoundPlan) -> Outcome:
        train = self.split(TRAIN)
        if len(train) == 0:
            raise ValueError("no labelled training images")
        t = self.cfg.train
        settings = TrainSettings(
            epochs=plan.local_epochs, max_steps=plan.local_steps, batch_size=t.batch_size, lr=t.lr,
            weight_decay=t.weight_decay, proximal_mu=plan.proximal_mu,
            seed=round_seed(t.seed + plan.seed, self.name, plan.server_round),
        )
        dp_on, target, delta = effective_budget(self.cfg.privacy, plan if plan.dp else None)
        metrics: dict[str, float] = {"num-examples": float(len(train))}
        dp = None
        ledger = None
        if dp_on:
            p = self.cfg.privacy
            ledger = Ledger.open(self.cfg.site.state_dir, plan.run, accountant=p.accountant, delta=delta,
                                 target_epsilon=target, max_grad_norm=p.max_grad_norm)
            q = sample_rate(len(train), t.batch_size)
            steps = plan.local_steps or plan.local_epochs * steps_per_epoch(len(train), t.batch_size)
            # The label-count release, still to be made this run (once, before the first private round).
            pending = ([count_release(p.count_noise_multiplier)]
                       if p.class_weights == "noisy" and ledger.class_counts is None else [])
            if ledger.noise_multiplier is None:
                total = planned_steps(len(train), t.batch_size, plan.num_rounds, plan.local_epochs, plan.local_steps)
                ledger.noise_multiplier = p.noise_multiplier or plan_noise(
                    target, delta, q, total, p.accountant, prefix=ledger.history + pending)
                ledger.planned_steps = total
                ledger.save()
            ok, after = ledger.affordable(ledger.noise_multiplier, q, steps, extra=pending)
            metrics.update({"epsilon": ledger.spent(), "delta": delta, "noise-multiplier": ledger.noise_multiplier,
                            "target-epsilon": target if target is not None else float("nan")})
            if not ok:
                ledger.decline(plan.server_round)
                self.log.warning("round %d: declined to train: epsilon would reach %.3f, above the site budget %.3f",
                            plan.server_round, after, target)
                metrics.update({"declined": 1.0, "epsilon-if-trained": after})
                return Outcome(arrays=None, metrics=metrics, declined=True)
            if pending:
                ledger.class_counts = noisy_counts(train.labels, self.model_cfg.n_classes, p.count_noise_multiplier)
                ledger.count_noise_multiplier = p.count_noise_multiplier
                ledger.history = ledger.history + pending
                ledger.save()
            settings.class_counts = ledger.class_counts
            settings.class_weights = p.class_weights == "noisy"
            # No seed: the batches and the noise come from OS entropy (see DPSettings.seed).
            dp = DPSettings(noise_multiplier=ledger.noise_multiplier, max_grad_norm=p.max_grad_norm,
                            accountant=p.accountant, grad_sample_mode=p.grad_sample_mode, history=ledger.history)
        res = train_local(self.model(), train, settings, dp=dp, global_arrays=global_arrays)
        if ledger is not None:
            ledger.record(plan.server_round, res.history)
            metrics["epsilon"] = ledger.spent()
            self.log.info("round %d: trained privately; epsilon spent so far %.3f of %s", plan.server_round,
                     metrics["epsilon"], target)
        metrics.update({"train-loss": res.loss, "steps": float(res.steps), "train-seconds": res.seconds,
                        "declined": 0.0})
        return Outcome(arrays=res.arrays, metrics=metrics)

    # --------------------------------------------------------------- evaluate
    def evaluate(self, arrays: "dict[str, np.ndarray]", split: int = TEST) -> dict[str, float]:
        m = self.model()
        load_arrays(m, arrays)
        test = self.split(split)
        val = self.split(VAL) if split == TEST else None
        out = evaluate(m, test, val)
        out["num-examples"] = float(len(test))
        return out
