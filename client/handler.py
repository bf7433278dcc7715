"""What a site does with one message from the coordinator, independent of how it arrived.

:class:`SiteHandler` turns a coordinator's :class:`flwr.app.Message` into its reply: the message's
type and action pick its typed request (:mod:`dicomfl.common.protocol.messages`, every value
checked), the request picks the site's algorithm (:mod:`dicomfl.client.algorithms`), and the
algorithm's typed reply becomes the answer. The handler itself knows no method. The
ClientApp (:mod:`dicomfl.client.app`) is a thin shell over it; the in-process grid of the
benchmark and the tests call it directly, with their own :class:`SiteResolver`.

Every reply holds only what :mod:`dicomfl.common.protocol` lists. Any exception — which could
quote a file name or a header value — is logged in full in the site's own log under a random
reference, and the coordinator receives only an error code (chosen by the exception's type, in
:func:`dicomfl.common.protocol.error_code`) and that reference.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message

from dicomfl.common import protocol as P
from dicomfl.common.config import ModelConfig
from dicomfl.common.errors import BadRequest, ConfigError
from dicomfl.common.wire import WireError, is_packed, pack, unpack

from . import algorithms
from .trainer import RoundPlan, SiteTrainer

log = logging.getLogger("dicomfl.site")


class SiteResolver:
    """Finds the :class:`SiteTrainer` a message is for, from the node config and the run's model.

    The default reads ``site-config=<path of site.yaml>`` from the SuperNode's node config and
    keeps one trainer per (site config, model config), so a long-lived process opens a site's
    data once. At most :attr:`max_trainers` are kept (the least recently used goes first): a
    coordinator that sends many model descriptions cannot make the site hold a trainer for each.
    The benchmark passes a resolver of its own (simulated sites held in memory).
    """

    #: Trainers kept at once. A run uses one model description (two with a local baseline).
    max_trainers = 4

    def __init__(self) -> None:
        self._trainers: OrderedDict[str, SiteTrainer] = OrderedDict()

    def load(self, site_config: str, model_cfg: ModelConfig) -> SiteTrainer:
        """A new trainer for ``site_config`` (override to serve sites from elsewhere)."""
        from dicomfl.common.config import load_site_config
        from dicomfl.common.logs import site_logger

        site = load_site_config(Path(site_config))
        return SiteTrainer(site, model_cfg, logger=site_logger(site.site.state_dir, site.site.name))

    def __call__(self, node_config: Mapping, model_cfg: ModelConfig) -> SiteTrainer:
        path = node_config.get("site-config")
        if not path:
            raise ConfigError("node config: site-config is not set")
        key = f"{path}|{model_cfg.model_dump_json()}"
        if key in self._trainers:
            self._trainers.move_to_end(key)
            return self._trainers[key]
        trainer = self.load(str(path), model_cfg)  # raises (not kept) for a model past the site's bounds
        self._trainers[key] = trainer
        while len(self._trainers) > self.max_trainers:
            self._trainers.popitem(last=False)
        return trainer


class InMemorySites(SiteResolver):
    """Sites held in memory, named by key: ``site-config=<key>`` selects one (simulations)."""

    def __init__(self, sites: Mapping[str, SiteTrainer]) -> None:
        super().__init__()
        self.sites = dict(sites)

    def load(self, site_config: str, model_cfg: ModelConfig) -> SiteTrainer:
        base = self.sites.get(site_config)
        if base is None:
            raise ConfigError(f"node config: no simulated site {site_config!r}")
        return SiteTrainer(base.cfg, model_cfg, data=base.data(), logger=base.log)


def round_plan(cfg: ConfigRecord) -> RoundPlan:
    """The round's plan from a train message's config record, every value checked against its
    pattern or bounds (:data:`dicomfl.common.protocol.BOUNDS`); raises :class:`BadRequest` otherwise."""
    return RoundPlan(**P.RoundConfig.from_config(cfg).fields())


class SiteHandler:
    """A site's answers to the coordinator's messages.

    Parameters
    ----------
    resolver : SiteResolver, optional
        Maps a message's node config and model to the site's trainer (default: site.yaml on disk).
    """

    def __init__(self, resolver: SiteResolver | None = None) -> None:
        self.resolver = resolver or SiteResolver()
        self._started = time.perf_counter()

    # ----------------------------------------------------------------- entry point
    def handle(self, msg: Message, context: Context) -> Message:
        """The reply to ``msg``: its algorithm's answer, or an error code and a log reference.

        The message's type and action (``<category>.<action>``) choose the typed request
        (:mod:`dicomfl.common.protocol.messages`), and the request chooses the algorithm
        (:mod:`dicomfl.client.algorithms`)."""
        kind = msg.metadata.message_type
        t0 = time.perf_counter()
        site_log = log
        try:
            P.route(kind)  # a type no site takes is refused before anything is read
            packed = msg.has_content() and is_packed(msg.content)
            if packed:  # the deployment's compact form (common/wire.py): read it, answer in it
                try:
                    msg.content = unpack(msg.content)
                except WireError as exc:
                    raise BadRequest(str(exc)) from None
            site, _ = self._site(msg, context)
            site_log = site.log
            (category, action), request = P.request_from_message(msg)
            algorithm = algorithms.select(category, action, request)
            reply = Message(content=getattr(algorithm, category)(site, request).to_record(), reply_to=msg)
            if packed and reply.has_content():
                reply.content = pack(reply.content)
            site_log.info("%s message handled by %s in %.2f s (handler up %.2f s)", kind, algorithm.name,
                          time.perf_counter() - t0, time.perf_counter() - self._started)
            return reply
        except Exception as exc:  # noqa: BLE001 - nothing of the exception may cross the boundary
            return self._error(msg, exc, site_log)
        except BaseException as exc:  # noqa: BLE001 - e.g. a native binding's panic; not an exit
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return self._error(msg, exc, site_log)

    def _error(self, msg: Message, exc: BaseException, site_log: logging.Logger) -> Message:
        ref = secrets.token_hex(6)
        code = P.error_code(exc)
        # The traceback goes in as exc_info: the log's formatter keeps it readable on its own lines,
        # while the message itself (which may quote a path) is escaped to one line.
        site_log.error("%s failed (ref=%s): %s", msg.metadata.message_type, ref, exc,
                       exc_info=(type(exc), exc, exc.__traceback__))
        return Message(Error(code=code, reason=P.error_reason(code, ref)), reply_to=msg)

    def _site(self, msg: Message, context: Context) -> tuple[SiteTrainer, ConfigRecord]:
        if not msg.has_content() or P.CONFIG not in msg.content or not isinstance(msg.content[P.CONFIG], ConfigRecord):
            raise BadRequest("message has no config record")
        cfg = msg.content[P.CONFIG]
        raw = P.model_description(cfg)
        try:
            model_cfg = ModelConfig.model_validate(json.loads(raw))
        except ValueError:  # JSON or schema: the text may quote the value, so it is not kept
            raise BadRequest(f"config {P.MODEL}: not a valid model description") from None
        return self.resolver(context.node_config, model_cfg), cfg
