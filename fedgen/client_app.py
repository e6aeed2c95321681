"""The Flower ClientApp: ``flwr run .`` and SuperNodes load ``app``; run_simulation.py
builds one with :func:`make_client_app` around an already validated config."""

from __future__ import annotations

import functools

from flwr.client import Client, ClientApp
from flwr.common import Context

from clients import LocalData, PhaseRouter
from fedgen.config import RunConfig
from fedgen.methods import METHODS


def client_for(cfg: RunConfig, context: Context) -> Client:
    local = LocalData.from_node(cfg, dict(context.node_config), context.run_id)
    return PhaseRouter(local, METHODS[cfg.method].clients).to_client()


def client_fn(context: Context) -> Client:
    return client_for(RunConfig.from_mapping(context.run_config), context)


def make_client_app(cfg: RunConfig) -> ClientApp:
    return ClientApp(client_fn=functools.partial(client_for, cfg))


app = ClientApp(client_fn=client_fn)
