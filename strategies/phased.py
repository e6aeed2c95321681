"""The phased strategy every method builds on.

A run is a sequence of :class:`Phase` s, each some Flower rounds long: a stats round (clients
report label histograms), then one classifier phase per arm (FedAvg over ResNet-18 with
centralised evaluation). Subclasses add phases by overriding :meth:`PhasedFedAvg.plan`
and register their aggregation in :meth:`PhasedFedAvg.aggregators`.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from typing import Callable, NoReturn

import numpy as np
from flwr.common import (EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedgen import checkpoint
from fedgen.aggregation import pool_evaluations, weighted_average
from fedgen.classifier import evaluate
from fedgen.config import DP_MODELS, RunConfig
from fedgen.data import ImageData
from fedgen.models import (build_classifier, classifier_shell, device, get_weights,
                           set_weights)
from fedgen.privacy import Ledger
from fedgen.results import Recorder
from fedgen.seeds import derive_seed
from fedgen.wire import pack, unpack
from strategies.roster import Roster, needed

log = logging.getLogger(__name__)

Results = list[tuple[ClientProxy, FitRes]]
Aggregated = tuple[Parameters | None, dict[str, Scalar]]
EMPTY = Parameters(tensors=[], tensor_type="numpy.ndarray")


@dataclass(frozen=True)
class Phase:
    """``kind`` is the client handler (fit config ``phase``); ``arm`` the data variant."""

    kind: str
    rounds: int
    arm: str = ""
    sends_weights: bool = False   # does the client need the current global weights?
    all_clients: bool = False     # every client, regardless of fraction-fit
    replay: bool = False          # leaves state on the clients that later rounds need (their
                                  # key, a synthetic batch): a resumed run replays it first

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arm}" if self.arm else self.kind


def update_problem(arrays: list[np.ndarray], sent: list[np.ndarray] | None) -> str | None:
    """Why a reply cannot be averaged (None if it can): non-finite values; for a weight
    reply (``sent`` = the weights the client got) a different number or shape of arrays."""
    if sent is not None:
        if len(arrays) != len(sent):
            return f"{len(arrays)} arrays, the model has {len(sent)}"
        for i, (a, s) in enumerate(zip(arrays, sent)):
            if a.shape != s.shape:
                return f"array {i} has shape {a.shape}, the model's is {s.shape}"
    for i, a in enumerate(arrays):
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return f"array {i} holds NaN or Inf"
    return None


def update_norm(arrays: list[np.ndarray], sent: list[np.ndarray]) -> float:
    """L2 norm of the update (reply - sent) over all floating-point arrays."""
    return float(np.sqrt(sum(float(((a.astype(np.float64) - s) ** 2).sum())
                             for a, s in zip(arrays, sent) if s.dtype.kind == "f")))


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of a message's arrays as they travel (numpy's serialised form, packed)."""
    return sum(len(t) for t in parameters.tensors)


class PhasedFedAvg(FedAvg):
    """FedAvg (McMahan et al., 2017) over a plan of phases, with a stats round.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration.
    data : ImageData
        The server's data: its test split drives centralised evaluation (it may hold no
        images at all when ``evaluation=clients``: then only its shape and classes count).
    recorder : Recorder
        Where results, timings and plots go.
    """

    supported_arms: tuple[str, ...] = ("real", "oversample", "noise")
    # Attributes that live across rounds, saved in the checkpoint after every round and
    # restored by a resumed run; a subclass lists its own (the union over the class
    # hierarchy is saved).
    checkpoint_attrs: tuple[str, ...] = ("run_key", "privacy")

    def __init__(self, cfg: RunConfig, data: ImageData, recorder: Recorder):
        super().__init__(fraction_fit=cfg.fraction_fit, fraction_evaluate=0.0,
                         min_fit_clients=1, min_evaluate_clients=0,
                         min_available_clients=cfg.num_clients, accept_failures=True)
        self.cfg, self.data, self.recorder = cfg, data, recorder
        self.device = device()
        self.arms = self.select_arms(cfg.arm_list)
        self.phases = self.plan()
        self.schedule = [(p, r) for p in self.phases for r in range(1, p.rounds + 1)]
        self.roster = Roster()
        self.histograms = self.roster.histograms      # node key -> label counts
        self.partition_of = self.roster.key_of        # client cid -> node key
        self._train_metrics: dict[str, float] = {}
        self._server_test: dict | None = None
        self._sent_bytes: dict[tuple[str, int], dict[str, int]] = {}
        self._sent_weights: list[np.ndarray] | None = None
        self._asked: dict[int, int] = {}   # server round -> nodes asked (fit)
        self._classifier_init = get_weights(self._classifier(
            seed=derive_seed(cfg.seed, "classifier-init")))
        # Names the clients' cache folders (synthetic batches, private models) for this run
        # and its resumptions, which Flower gives new run ids.
        self.run_key = secrets.token_hex(8)
        self._global: Parameters | None = None   # what Flower hands the next round
        self._done = 0                            # last finished round of a resumed run
        self._saved_histograms: dict | None = None
        # The server rounds Flower runs, in order: all of them; a resumed run replays the
        # rounds that set up client state, then goes on after the checkpoint.
        self._rounds = list(range(1, len(self.schedule) + 1))
        self._fit_round = 0
        self.privacy = Ledger(cfg, tuple(m for m in DP_MODELS
                                         if any(p.kind == m for p in self.phases)),
                              self.privacy_notes())
        recorder.set_section("privacy", self.privacy.section())

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Raise a ConfigError for settings this method cannot run with; called before
        any work starts (``fedgen.methods.method_for``). Nothing to check here."""

    # ----------------------------------------------------------------- the plan
    def select_arms(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        """The requested arms this method can run (others are dropped with a warning)."""
        dropped = [a for a in requested if a not in self.supported_arms]
        kept = tuple(a for a in requested if a in self.supported_arms) or ("real",)
        if dropped:
            log.warning("method %s does not run arm(s) %s; running %s", self.cfg.method,
                        ", ".join(dropped), ", ".join(kept))
        return kept

    def plan(self) -> list[Phase]:
        """The phases of the run, in order."""
        return [Phase("stats", 1, all_clients=True, replay=True),
                *(Phase("classify", self.cfg.classifier_rounds, arm=a, sends_weights=True)
                  for a in self.arms)]

    @property
    def num_rounds(self) -> int:
        """Server rounds of the whole run."""
        return len(self.schedule)

    @property
    def flower_rounds(self) -> int:
        """Rounds Flower's loop runs: all of them, or, resumed, the replays and the rest."""
        return len(self._rounds)

    def server_round(self, flower_round: int) -> int:
        """The run's server round of Flower's loop round ``flower_round`` (0: the initial
        evaluation)."""
        return self._rounds[flower_round - 1] if flower_round > 0 else 0

    def locate(self, server_round: int) -> tuple[Phase, int]:
        """The phase of a server round and the round number inside that phase."""
        return self.schedule[server_round - 1]

    def aggregators(self) -> dict[str, Callable[[Phase, int, Results], Aggregated]]:
        """Phase kind -> how its results are aggregated."""
        return {"stats": self.aggregate_stats, "classify": self.aggregate_classifier}

    # ------------------------------------------------------------ Flower hooks
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        if self._done:   # resumed: the global parameters of the checkpoint
            return self._global
        first = self.phases[0]
        start = self.start_phase(first)
        return ndarrays_to_parameters(start) if start is not None else EMPTY

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        server_round = self.server_round(server_round)
        phase, rnd = self.locate(server_round)
        if rnd == 1 and server_round > 1:
            start = self.start_phase(phase)
            if start is not None:
                parameters = ndarrays_to_parameters(start)
        elif server_round == self._done + 1 and self._done:   # resumed inside a phase
            self.recorder.start_phase(phase.name)
        self.recorder.start_round()
        config = self.fit_config(phase, rnd, server_round)
        sent = parameters if phase.sends_weights else EMPTY
        clients = self.select_clients(phase, server_round, client_manager)
        self.roster.asked("fit", server_round, clients)
        # Packed into one tensor for the trip (fedgen.wire); the hooks see plain Parameters.
        # Each distinct payload is packed once: the weights every client gets stay one
        # copy, not one per client. The payload is kept beside its packed form, so its
        # id() cannot be reused by a later client's payload.
        packed: dict[int, tuple[Parameters, Parameters]] = {}
        messages = []
        for client in clients:
            payload = self.payload_for(phase, client, sent)
            if id(payload) not in packed:
                packed[id(payload)] = (payload, pack(payload))
            messages.append((client, FitIns(packed[id(payload)][1],
                                            self.config_for(phase, client, dict(config)))))
        self._sent_weights = parameters_to_ndarrays(sent) if phase.sends_weights else None
        self._sent_bytes[("fit", server_round)] = {c.cid: payload_bytes(ins.parameters)
                                                   for c, ins in messages}
        return messages

    def aggregate_fit(self, server_round: int, results: Results,
                      failures: list) -> Aggregated:
        server_round = self.server_round(server_round)
        phase, rnd = self.locate(server_round)
        self.check_replies("fit", server_round, results, failures)
        # Results arrive in completion order; summing float32 weights in that order made
        # reruns of one seed drift apart (76.1 vs 77.8 % on one arm). Node order is fixed.
        results = sorted(results, key=lambda r: self.partition_order(r[0]))
        self.log_traffic("fit", server_round, results)
        results = self.screen(server_round, results)
        self._train_metrics = self.train_summary(results)
        self._fit_round = server_round
        if self.privacy.record_dp_sgd(server_round, {self.roster.label(c.cid): r.metrics
                                                     for c, r in results}):
            self.recorder.set_section("privacy", self.privacy.section())
        return self.aggregators()[phase.kind](phase, rnd, results)

    def log_traffic(self, kind: str, server_round: int, results: list) -> None:
        """Bytes of the arrays each node was sent and sent back this round (results.json
        ``communication``); a node that failed counts what it was sent."""
        phase, rnd = self.locate(server_round)
        sent = self._sent_bytes.pop((kind, server_round), {})
        replies = {c.cid: payload_bytes(r.parameters) for c, r in results
                   if hasattr(r, "parameters")}
        nodes = {self.roster.label(cid): (down, replies.get(cid, 0))
                 for cid, down in sent.items()}
        self.recorder.log_traffic(kind, phase.name, rnd, server_round, nodes)

    # Phases whose replies are new weights of the model the server sent.
    WEIGHT_PHASES = ("classify", "diffusion", "local-ddpm")

    def screen(self, server_round: int, results: Results) -> Results:
        """Unpack each reply's arrays (:mod:`fedgen.wire`) and reject those that would
        poison the global model: unreadable arrays or arrays with NaN/Inf (any phase);
        for weight phases also a wrong number or shape of arrays, or an update norm above
        ``max-update-norm-ratio`` x the round's median. Rejections are logged and recorded
        in results.json ``rejected``; too few survivors fail the round. Returns the kept
        replies, unpacked."""
        phase, rnd = self.locate(server_round)
        sent = self._sent_weights if phase.kind in self.WEIGHT_PHASES else None
        kept, norms, reasons, opened = [], {}, {}, []
        for client, res in results:
            try:
                res = FitRes(res.status, unpack(res.parameters), res.num_examples,
                             res.metrics)
                arrays = parameters_to_ndarrays(res.parameters)
            except (ValueError, EOFError) as exc:   # not a packed or numpy payload
                arrays, reasons[client.cid] = None, f"unreadable arrays ({exc})"
            opened.append((client, res))
            if arrays is None:
                continue
            reason = update_problem(arrays, sent)
            if reason is None and sent is not None:
                norms[client.cid] = update_norm(arrays, sent)
            if reason:
                reasons[client.cid] = reason
        # Under central DP clipping bounds every update; a rejection that depends on the
        # other clients' norms would sit outside the accounting.
        ratio = 0.0 if self.privacy.mechanism(phase.kind) else self.cfg.max_update_norm_ratio
        if ratio > 0 and len(norms) > 1:
            median = float(np.median(list(norms.values())))
            for cid, norm in norms.items():
                if median > 0 and norm > ratio * median:
                    reasons[cid] = (f"update norm {norm:.3g} is {norm / median:.1f}x the "
                                    f"round's median {median:.3g} (max-update-norm-ratio="
                                    f"{ratio:g})")
        for client, res in opened:
            if client.cid in reasons:
                node = self.roster.label(client.cid)
                self.recorder.log_rejection(phase.name, rnd, server_round, node,
                                            reasons[client.cid])
                log.warning("round %d (%s): rejected the update of %s: %s", server_round,
                            phase.name, node, reasons[client.cid])
            else:
                kept.append((client, res))
        asked = self._asked.get(server_round, len(results))
        if reasons and len(kept) < needed(asked, self.cfg.min_fit_fraction):
            self.fail(f"round {server_round} ({phase.name}): {len(kept)} of {asked} update(s) "
                      f"survived the sanity checks, fewer than min-fit-fraction="
                      f"{self.cfg.min_fit_fraction:g} needs; first rejection: "
                      f"{self.roster.label(next(iter(reasons)))}: {next(iter(reasons.values()))}")
        return kept

    def check_replies(self, kind: str, server_round: int, results: list, failures: list
                      ) -> None:
        """Record the nodes that failed or timed out; fail the run, with a message that
        says why, when fewer than ``min-fit-fraction`` of the nodes asked replied."""
        phase, rnd = self.locate(server_round)
        asked, failed, errors = self.roster.account(kind, server_round, results, failures)
        self._asked[server_round] = asked
        if failed:
            self.recorder.log_failures(kind, phase.name, rnd, server_round, asked,
                                       len(results), failed, errors)
            for f in failed:
                log.warning("round %d (%s, %s): %s failed: %s", server_round, phase.name,
                            kind, f["node"], f["reason"])
        if len(results) < needed(asked, self.cfg.min_fit_fraction):
            first = failed[0] if failed else {"node": "-", "reason": "none"}
            message = (f"round {server_round} ({phase.name}, {kind}): {len(results)} of "
                       f"{asked} node(s) replied, fewer than min-fit-fraction="
                       f"{self.cfg.min_fit_fraction:g} needs; first failure: "
                       f"{first['node']}: {first['reason']}")
            self.fail(message)

    def fail(self, message: str) -> NoReturn:
        """Stop the run: ``results.json`` says why (what it measured stays), and so does
        the run's status (``flwr list``)."""
        self.recorder.fail(message)
        raise RuntimeError(message)

    def partition_order(self, client: ClientProxy) -> tuple:
        """Sort key: the node's key (known after the stats round), then cid."""
        return self.roster.order(client)

    def evaluate(self, server_round: int, parameters: Parameters):
        """Centralised evaluation on the server's test split (evaluation=server/both)."""
        self._global = parameters   # Flower calls this after every round's aggregation
        server_round = self.server_round(server_round)
        if server_round == 0 or self.cfg.evaluation == "clients":
            return None
        phase, rnd = self.locate(server_round)
        if phase.kind != "classify":
            return None
        model = classifier_shell(self.cfg, self.data.channels, self.data.num_classes)
        set_weights(model, parameters_to_ndarrays(parameters))
        res = evaluate(model, self.data.test_x, self.data.test_y, self.data.num_classes,
                       self.device)
        if self.cfg.evaluation == "server":
            self.log_classifier_round(phase, rnd, server_round, res)
        else:
            self._server_test = res  # logged with the clients' figures of this round
        return res["loss"], {"accuracy": res["accuracy"]}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """evaluation=clients/both: every node evaluates the global classifier on its own
        held-out images after each classifier round."""
        server_round = self.server_round(server_round)
        phase, rnd = self.locate(server_round)
        if self.cfg.evaluation == "server" or phase.kind != "classify":
            self.end_round(server_round)   # nothing more happens in this round
            return []
        clients = self.roster.members(client_manager.all().values())
        self.roster.asked("evaluate", server_round, clients)
        config = {**self.fit_config(phase, rnd, server_round), "evaluate": True}
        parameters = pack(parameters)
        self._sent_bytes[("evaluate", server_round)] = {
            c.cid: payload_bytes(parameters) for c in clients}
        return [(c, EvaluateIns(parameters, dict(config))) for c in clients]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list):
        """Pool the nodes' figures (sample-weighted) and log the round."""
        server_round = self.server_round(server_round)
        phase, rnd = self.locate(server_round)
        self.check_replies("evaluate", server_round, results, failures)
        results = sorted(results, key=lambda r: self.partition_order(r[0]))
        self.log_traffic("evaluate", server_round, results)
        pooled = pool_evaluations([(self.roster.label(c.cid), r.num_examples, r.loss, r.metrics)
                                   for c, r in results], self.data.num_classes)
        test = pooled if self.cfg.evaluation == "clients" else self._server_test
        self.log_classifier_round(phase, rnd, server_round, test, pooled)
        self.end_round(server_round)
        return pooled["loss"], {"accuracy": pooled["accuracy"]}

    # ------------------------------------------------------- checkpoint/resume
    def state_attrs(self) -> list[str]:
        """The ``checkpoint_attrs`` of this class and every base class."""
        names: list[str] = []
        for cls in reversed(type(self).__mro__):
            names += [a for a in cls.__dict__.get("checkpoint_attrs", ()) if a not in names]
        return names

    def end_round(self, server_round: int) -> None:
        """Write the checkpoint of a finished round (``<out>/checkpoint.pkl``, atomic): the
        state a resumed run needs to end exactly where this one would have. A replayed
        round of a resumed run changes nothing and writes nothing."""
        if server_round <= self._done or self.recorder.results["status"] == "failed":
            return
        phase, rnd = self.locate(server_round)
        checkpoint.save(self.recorder.out, {
            "config": self.cfg.to_mapping(), "round": server_round,
            "rounds": self.num_rounds, "phase": phase.name, "phase_round": rnd,
            "finished": server_round == self.num_rounds,
            "parameters": self._global, "histograms": dict(self.histograms),
            "state": {a: getattr(self, a) for a in self.state_attrs()},
            "results": self.recorder.results})

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint (:func:`fedgen.checkpoint.load`): its state, its
        results, and a round list that replays the finished rounds marked ``replay`` (the
        stats round, so that the new run's nodes are known by their keys again; a
        generation round, so that every client holds its synthetic batch again), then runs
        the rounds after the checkpoint."""
        self._done = int(state["round"])
        if state["rounds"] != self.num_rounds:
            raise checkpoint.ConfigError(
                f"resume: the checkpoint's run has {state['rounds']} rounds, this one "
                f"{self.num_rounds}; the plan of the method changed")
        self._global = state["parameters"]
        self._saved_histograms = state["histograms"]
        self.histograms.update(state["histograms"])
        for name, value in state["state"].items():
            setattr(self, name, value)
        self.recorder.resume(state["results"], self._done)
        replays = [r for r, (p, _) in enumerate(self.schedule, 1)
                   if p.replay and r <= self._done]
        self._rounds = replays + list(range(self._done + 1, self.num_rounds + 1))
        phase, rnd = self.locate(self._done)
        log.info("resuming after round %d of %d (%s round %d/%d); replaying round(s) %s",
                 self._done, self.num_rounds, phase.name, rnd, phase.rounds,
                 ", ".join(map(str, replays)) or "none")

    def log_classifier_round(self, phase: Phase, rnd: int, server_round: int, test: dict,
                             clients: dict | None = None) -> None:
        self.recorder.log_round(phase.arm, rnd, server_round, test, self._train_metrics,
                                clients)
        log.info("[%s] round %d/%d  %s accuracy %.2f%%  (train loss %.3f, %d samples)",
                 phase.name, rnd, phase.rounds,
                 "clients'" if self.cfg.evaluation == "clients" else "test",
                 100 * test["accuracy"], self._train_metrics.get("loss", float("nan")),
                 self._train_metrics.get("samples", 0))
        if self._train_metrics.get("augment_dropped"):
            log.info("[%s] round %d/%d  screening left out %d added rows", phase.name,
                     rnd, phase.rounds, self._train_metrics["augment_dropped"])
        if clients is not None and self.cfg.evaluation == "both":
            log.info("[%s] round %d/%d  clients' accuracy %.2f%%", phase.name, rnd,
                     phase.rounds, 100 * clients["accuracy"])
        if server_round == self.num_rounds:
            self.recorder.finish()

    # -------------------------------------------------------- overridable parts
    def start_phase(self, phase: Phase) -> list[np.ndarray] | None:
        """Called once at a phase's first round; returns the weights it starts from
        (None = keep the current global weights). Classifier arms all start from the same
        seeded ResNet-18."""
        self.recorder.start_phase(phase.name)
        log.info("phase %s: %d round(s)", phase.name, phase.rounds)
        return self._classifier_init if phase.kind == "classify" else None

    def fit_config(self, phase: Phase, rnd: int, server_round: int) -> dict[str, Scalar]:
        """Settings the clients read: what to do this round, and how."""
        config: dict[str, Scalar] = {"phase": phase.kind, "arm": phase.arm,
                                     "round": rnd, "server-round": server_round,
                                     "run-key": self.run_key,
                                     "last-round": server_round == self.num_rounds,
                                     "class-names": ",".join(self.data.classes)}
        if phase.kind == "classify":
            config.update({"epochs": self.cfg.local_epochs, "batch-size": self.cfg.batch_size,
                           "lr": self.cfg.lr,
                           "augment-loss-weight": self.cfg.augment_loss_weight,
                           "augment-filter": self.cfg.augment_filter,
                           "augment-filter-from": self.cfg.augment_filter_from})
        # Keyed to (seed, phase, round WITHIN the phase); clients mix in their partition
        # id (clients.local.LocalData.seed). Not the server round: an arm then trains
        # identically whichever phases ran before it, so methods compare on equal terms.
        config["seed"] = derive_seed(self.cfg.seed, phase.name, rnd)
        if server_round <= self._done:
            config["replay"] = True   # a resumed run's replay of a finished round
        return config

    def select_clients(self, phase: Phase, server_round: int,
                       client_manager: ClientManager) -> list[ClientProxy]:
        """The nodes connected now that reported in the stats round (which comes first),
        ordered by node key: all of them for data rounds, otherwise a seeded
        ``fraction-fit`` share, so the same seed picks the same nodes. Only the first round
        waits for ``num-clients`` nodes, and at most ``node-wait-timeout`` seconds."""
        if server_round == 1:
            self.wait_for_nodes(client_manager)
        clients = self.roster.members(client_manager.all().values())
        if not clients:
            self.fail(f"round {server_round} ({phase.name}): no node is connected")
        if phase.all_clients or self.cfg.fraction_fit >= 1.0:
            return clients
        n = max(1, round(self.cfg.fraction_fit * len(clients)))
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "sample", phase.name,
                                                self.locate(server_round)[1]))
        return [clients[i] for i in sorted(rng.choice(len(clients), size=n, replace=False))]

    def wait_for_nodes(self, client_manager: ClientManager) -> None:
        """Wait up to ``node-wait-timeout`` s for ``num-clients`` nodes; go on with fewer
        if they are enough for ``min-fit-fraction``, else fail with a clear message."""
        want = self.cfg.num_clients
        if client_manager.wait_for(want, timeout=int(self.cfg.node_wait_timeout)):
            return
        have = client_manager.num_available()
        if have < needed(want, self.cfg.min_fit_fraction):
            message = (f"only {have} of num-clients={want} node(s) connected within "
                       f"node-wait-timeout={self.cfg.node_wait_timeout:g} s; "
                       f"min-fit-fraction={self.cfg.min_fit_fraction:g} needs "
                       f"{needed(want, self.cfg.min_fit_fraction)}")
            self.fail(message)
        log.warning("%d of num-clients=%d node(s) connected after %g s; going on with them",
                    have, want, self.cfg.node_wait_timeout)

    def payload_for(self, phase: Phase, client: ClientProxy, parameters: Parameters
                    ) -> Parameters:
        """What one client receives; the default is the same for every client."""
        return parameters

    def config_for(self, phase: Phase, client: ClientProxy, config: dict[str, Scalar]
                   ) -> dict[str, Scalar]:
        """One client's fit config (a copy of the round's :meth:`fit_config`); the default
        is the same for every client, CollaFuse adds the client's cut point."""
        return config

    def aggregate_weights(self, results: Results, uniform: bool = False,
                          models: list[list[np.ndarray]] | None = None) -> list[np.ndarray]:
        """Sample-weighted FedAvg of the clients' arrays (``uniform``: plain mean). Under
        central DP for the round's model (``dp-clipping-norm``) the uniform mean of the
        clipped updates plus Gaussian noise (:mod:`fedgen.privacy`), whatever ``uniform``
        says: the noise is calibrated to that mean. ``models``: the replies' arrays when
        the caller has deserialised them already."""
        if models is None:
            models = [parameters_to_ndarrays(r.parameters) for _, r in results]
        phase, _ = self.locate(self._fit_round)
        if self.privacy.mechanism(phase.kind) and self._sent_weights is not None:
            asked = self._asked.get(self._fit_round, len(results))
            mean = self.privacy.aggregate(phase.kind, models, self._sent_weights,
                                          asked / max(len(self.roster.keys), 1),
                                          self._fit_round)
            self.recorder.set_section("privacy", self.privacy.section())
            return mean
        weights = [1.0 if uniform else float(r.num_examples) for _, r in results]
        return weighted_average(models, weights)

    def privacy_notes(self) -> list[str]:
        """What leaves the clients that no DP setting of this run covers (results.json
        ``privacy.not_covered``); methods add their own uploads."""
        cfg, notes = self.cfg, ["every reply: its example count, training loss and steps",
                                "the server itself: it sees every raw update (central DP "
                                "protects the global models it releases)"]
        if cfg.histogram_epsilon == 0:
            notes.append("stats round: each client's exact label histogram")
        sgd = " (sample-level: DP-SGD)" if cfg.dp_sgd_noise_multiplier else ""
        notes += [f"{kind}: the averaged weight updates (no dp-clipping-norm for it)"
                  f"{sgd if kind == 'diffusion' else ''}"
                  for kind in DP_MODELS if any(p.kind == kind for p in self.phases)
                  and kind not in cfg.central_dp]
        if cfg.evaluation != "server":
            notes.append("client evaluation: each node's accuracy and per-class counts")
        return notes

    def aggregate_classifier(self, phase: Phase, rnd: int, results: Results) -> Aggregated:
        return ndarrays_to_parameters(self.aggregate_weights(results)), self._train_metrics

    def aggregate_stats(self, phase: Phase, rnd: int, results: Results) -> Aggregated:
        """Learn each node's key (partition id or node name) and label histogram (nothing
        else)."""
        for client, res in results:
            self.roster.report(client.cid, res.metrics)
        keys = self.roster.keys
        if self._saved_histograms is not None:   # a resumed run: the same nodes?
            self.check_same_nodes(results)
        hist = np.stack([self.histograms[k] for k in keys])
        self.recorder.set_partition(keys, hist)
        log.info("stats: %d clients, sizes %s", len(keys), hist.sum(1).tolist())
        return None, {}

    def check_same_nodes(self, results: Results) -> None:
        """A resumed run must see the nodes of the checkpoint with the same labels (nodes
        under ``histogram-epsilon`` do not report again: a new noisy copy would cost
        epsilon; the plan keeps the saved noisy counts)."""
        saved = self._saved_histograms
        reported = {self.roster.key_of[c.cid]: r.metrics.get("histogram") for c, r in results}
        changed = [k for k, h in reported.items() if h is not None and k in saved
                   and not np.array_equal(saved[k], json.loads(str(h)))]
        missing = [k for k in saved if k not in reported]
        if changed:
            self.fail(f"resume: node(s) {changed} report other label counts than in the "
                      f"checkpoint; this is not the same data")
        if missing:
            log.warning("resume: node(s) %s of the checkpoint did not report", missing)

    @staticmethod
    def train_summary(results: Results) -> dict[str, float]:
        """Steps, samples and sample-weighted training loss of a round."""
        n = [r.num_examples for _, r in results]
        losses = [float(r.metrics.get("loss", np.nan)) for _, r in results]
        return {"steps": int(sum(int(r.metrics.get("steps", 0)) for _, r in results)),
                "client_seconds": float(sum(float(r.metrics.get("client-seconds", 0.0))
                                            for _, r in results)),
                "samples": int(sum(n)),
                "augment_dropped": int(sum(int(r.metrics.get("augment-dropped", 0))
                                           for _, r in results)),
                "loss": float(np.average(losses, weights=n)) if sum(n) else float("nan")}

    def _classifier(self, seed: int = 0):
        return build_classifier(self.cfg, self.data.channels, self.data.num_classes, seed)

