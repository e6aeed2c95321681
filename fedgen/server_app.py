"""The Flower ServerApp: ``flwr run .`` loads ``app``; run_simulation.py builds one with
:func:`make_server_app` around an already validated config."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.common import Context
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from fedgen import checkpoint, logs
from fedgen.config import ConfigError, RunConfig
from fedgen.data import ImageData, load_data
from fedgen.methods import method_for
from fedgen.models import check_precision, device
from fedgen.results import Recorder

log = logging.getLogger(__name__)


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / f"{stamp}-{cfg.method}-{cfg.dataset}"


def check_server_data(cfg: RunConfig, data: ImageData) -> None:
    """Centralised evaluation needs a test split on the server; bf16 needs hardware
    that has it (:func:`fedgen.models.check_precision`)."""
    check_precision(cfg.mixed_precision, device())
    if cfg.evaluation != "clients" and not len(data.test_y):
        raise ConfigError(f"evaluation={cfg.evaluation} needs a test split on the server, "
                          f"which holds none (dataset={cfg.dataset}, data-dir="
                          f"{cfg.data_dir!r}); use evaluation=clients")


def build_strategy(cfg: RunConfig):
    """The method's strategy, with the server's data and a recorder for the outputs;
    with ``resume-from``, restored from that folder's checkpoint (whose config must equal
    ``cfg`` but for the output folder) and writing into it."""
    state = None
    if cfg.resume_from:
        cfg, state = checkpoint.resume_config(cfg.resume_from, cfg)
    out = Path(cfg.out_dir or default_out_dir(cfg)).resolve()
    cfg = cfg.replace(out_dir=str(out))
    data = load_data(cfg)
    check_server_data(cfg, data)
    recorder = Recorder(out, cfg, data.classes, resuming=state is not None)
    strategy = method_for(cfg).strategy(cfg, data, recorder)
    if state is not None:
        strategy.restore(state)
    log.info("%s: %d rounds (%s); outputs in %s", cfg.method, strategy.num_rounds,
             ", ".join(f"{p.name}x{p.rounds}" for p in strategy.phases), out)
    return strategy


def components(cfg: RunConfig) -> ServerAppComponents:
    strategy = build_strategy(cfg)
    timeout = cfg.round_timeout or None  # 0 = no limit
    return ServerAppComponents(strategy=strategy, config=ServerConfig(
        num_rounds=strategy.flower_rounds, round_timeout=timeout))


def server_fn(context: Context) -> ServerAppComponents:
    logs.setup()
    return components(RunConfig.from_mapping(context.run_config))


def make_server_app(cfg: RunConfig) -> ServerApp:
    return ServerApp(server_fn=lambda context: components(cfg))


app = ServerApp(server_fn=server_fn)
