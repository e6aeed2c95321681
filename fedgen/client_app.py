"""The Flower ClientApp: ``flwr run .`` and SuperNodes load ``app``; run_simulation.py
builds one with :func:`make_client_app` around an already validated config."""

from __future__ import annotations

from typing import Mapping

from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context

from clients import LocalData, PhaseRouter
from fedgen import logs
from fedgen.config import RunConfig
from fedgen.methods import method_for

Handlers = Mapping[str, type[NumPyClient]]


def client_for(cfg: RunConfig, context: Context, clients: Handlers | None = None) -> Client:
    """The node's client; its data loads at its first round, in the run's label space
    (``class-names``, else the class names the server sends)."""
    node_config = dict(context.node_config)

    def load(classes: tuple[str, ...]) -> LocalData:
        return LocalData.from_node(cfg, node_config, context.run_id, classes)

    handlers = clients if clients is not None else method_for(cfg).clients
    return PhaseRouter(load, handlers)


def client_fn(context: Context) -> Client:
    logs.setup()
    return client_for(RunConfig.from_mapping(context.run_config), context)


def make_client_app(cfg: RunConfig) -> ClientApp:
    """Resolve the method's client classes HERE, in the process that registered the
    method: simulation workers are other processes, whose registry lacks methods a user
    registered at run time; the classes travel to them inside the app (by value)."""
    clients = dict(method_for(cfg).clients)

    def method_client_fn(context: Context) -> Client:
        return client_for(cfg, context, clients)

    return ClientApp(client_fn=method_client_fn)


app = ClientApp(client_fn=client_fn)
