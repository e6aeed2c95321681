"""A real Flower deployment on loopback, built from the commands in docker/compose.yml.

``Deployment`` starts, in a temporary folder, what ``docker compose -f docker/compose.yml up``
starts in containers, as plain processes:

* ``docker/make-certs.sh`` makes a throw-away CA, the SuperLink certificate and one
  ECDSA key pair per SuperNode;
* one ``flower-superlink`` (TLS, ``--enable-supernode-auth``, ``--database`` file,
  ``--isolation process``) plus the ``flower-superexec`` that runs its ServerApps;
* N ``flower-supernode`` (``--root-certificates``, ``--auth-supernode-private-key``,
  ``--isolation process``, their own ``--port`` and ``--node-config``), each with its own
  ``flower-superexec`` that runs its ClientApps, after ``flwr supernode register``.

The flags are read from the compose file's ``command`` lists; only what differs between a
container and this machine is replaced: secret/volume paths become files in the temporary
folder, service host names become 127.0.0.1, ports become free loopback ports, and the
node config is the one the test asks for. The ``flwr`` CLI talks to it through a
``[superlink.NAME]`` entry in ``$FLWR_HOME/config.toml`` (``FLWR_HOME`` is temporary too).

Every process is started in its own session (process group); ``stop()`` kills each group
and every descendant it finds, and runs on ``__exit__`` whatever happened. Every
process but the SuperLink runs at a lower priority (see ``NODE_NICE``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
MAKE_CERTS = DOCKER / "make-certs.sh"
LOOPBACK = "127.0.0.1"
BINARIES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
# In compose every site is its own machine; here N sites' ClientApps share the SuperLink's
# cores. Flower 1.41's SQLite state gives up on a write lock after 5 s (busy_timeout 5000),
# and a SuperLink starved of CPU by the ClientApps' torch work held its lock that long on a
# 2-core CI machine ("database is locked" -> the ServerApp's pull failed, the run failed).
# So the site side (SuperNode, its SuperExec and the ClientApps they start) and the
# ServerApp's SuperExec (with the ServerApp, whose generation round and evaluations are
# CPU work as well) and the test's own ``flwr`` CLI calls run niced: the SuperLink alone
# keeps the default priority.
NODE_NICE = 10


class DeploymentError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [b for b in (*BINARIES, "openssl", "ssh-keygen") if shutil.which(b) is None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def toml_value(value: Any) -> str:
    """One run-config / node-config value as TOML (strings quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"run/node config values are bool/int/float/str, not {type(value)}")


def config_string(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def preset(path: Path | str, **overrides: Any) -> dict[str, Any]:
    """A preset file (e.g. configs/smoke.toml) with overrides (``out_dir`` -> ``out-dir``).

    ``flwr run --run-config FILE`` cannot be combined with ``key=value`` pairs, so
    ``Deployment.run`` always sends one ``key=value`` string built from this dict."""
    with open(ROOT / path, "rb") as fh:
        values = tomllib.load(fh)
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return values


def compose_services(compose: Path = COMPOSE) -> dict[str, dict]:
    with open(compose, encoding="utf-8") as fh:
        return yaml.safe_load(fh)["services"]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc; children may leave the group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill ``proc``'s process group (it leads its own session) and all descendants."""
    if proc.poll() is None:
        pids = _descendants(proc.pid)
    else:
        pids = []
    for target in (lambda: os.killpg(proc.pid, sig), *(
            (lambda p=p: os.kill(p, sig)) for p in pids)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    # Stragglers that started their own session under a descendant
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Proc:
    """One started command: its Popen, log file and role."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str],
                 nice: int = 0):
        self.name, self.argv, self.log = name, argv, log
        self._fh = open(log, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True,
                                      preexec_fn=(lambda: os.nice(nice)) if nice else None)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        _kill_tree(self.popen, signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Deployment:
    """SuperLink + N SuperNodes (+ their SuperExecs) on loopback, TLS and node auth on.

    Use as a context manager::

        with Deployment(tmp_path, node_configs=[{"partition-id": i, "num-partitions": 3}
                                                for i in range(3)]) as dep:
            run_id = dep.run(preset("configs/smoke.toml", out_dir=...))
            assert dep.wait(run_id, timeout=600) == "finished:completed"
    """

    def __init__(self, workdir: Path, node_configs: list[dict[str, Any]],
                 name: str = "fedgen-test", compose: Path = COMPOSE,
                 node_timeout: float = 120.0):
        self.dir = Path(workdir)
        self.node_configs = node_configs
        self.num_nodes = len(node_configs)
        self.name = name
        self.services = compose_services(compose)
        self.node_timeout = node_timeout
        self.certs = self.dir / "certs"
        self.state = self.dir / "state"
        self.logs = self.dir / "logs"
        self.home = self.dir / "flwr-home"
        self.procs: list[Proc] = []
        self.nodes: list[Proc] = []  # SuperNode i (0-based)
        self.node_execs: list[Proc] = []  # its SuperExec
        self.node_ids: list[int] = []
        self.ports: dict[str, int] = {}
        self.env = {**os.environ,
                    "FLWR_HOME": str(self.home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PYTHONUNBUFFERED": "1"}
        # N ClientApps share this machine's cores (in compose each has its container):
        # one torch thread each unless the caller chose otherwise.
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- compose -> argv
    def _argv(self, service: str, binary: str, *, node: int | None = None,
              port: int | None = None, node_config: dict | None = None) -> list[str]:
        """The compose service's command with container specifics swapped for local ones."""
        spec = self.services[service]
        paths: dict[str, str] = {}
        for secret in spec.get("secrets", []):
            source = secret["source"]
            filename = Path(self._secret_file(source)).name
            if node is not None and re.fullmatch(r"node-\d+", filename):
                filename = f"node-{node + 1}"
            paths[secret["target"]] = str(self.certs / filename)
        for volume in spec.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source == "superlink-state":
                paths[target] = str(self.state)
        argv = [binary]
        command = [str(a) for a in spec["command"]]
        i = 0
        while i < len(command):
            flag = command[i]
            argv.append(flag)
            if flag.startswith("--") and i + 1 < len(command) and \
                    not command[i + 1].startswith("--"):
                value = command[i + 1]
                i += 1
                if flag == "--host":
                    value = LOOPBACK
                elif flag == "--port":
                    value = str(port)
                elif flag == "--node-config":
                    value = config_string(node_config or {})
                else:
                    value = self._local_value(value, paths, node)
                argv.append(value)
            i += 1
        return argv

    def _secret_file(self, source: str) -> str:
        with open(COMPOSE, encoding="utf-8") as fh:
            return yaml.safe_load(fh)["secrets"][source]["file"]

    def _local_value(self, value: str, paths: dict[str, str], node: int | None) -> str:
        for target, local in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            if value == target or value.startswith(target + "/"):
                return local + value[len(target):]
        host, sep, _ = value.rpartition(":")
        if sep and host in self.services:
            if host.startswith("supernode-") and node is not None:
                return f"{LOOPBACK}:{self.ports[f'supernode-{node + 1}']}"
            return f"{LOOPBACK}:{self.ports[host]}"
        return value

    def _service(self, kind: str, node: int) -> str:
        name = f"{kind}-{node + 1}"
        return name if name in self.services else f"{kind}-1"

    # ---------------------------------------------------------------- processes
    def _start(self, name: str, argv: list[str], nice: int = 0) -> Proc:
        proc = Proc(name, argv, self.logs / f"{name}.log", self.env, nice)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120, check: bool = True
             ) -> subprocess.CompletedProcess:
        # niced like the sites: each call is a Python process of ~2.6 s CPU (flwr 1.41)
        res = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, cwd=self.dir,
                             preexec_fn=lambda: os.nice(NODE_NICE))
        if check and res.returncode != 0:
            raise DeploymentError(f"flwr {' '.join(args)} -> rc {res.returncode}\n"
                                  f"{res.stdout}\n{res.stderr}")
        return res

    def flwr_json(self, *args: str, timeout: float = 120) -> dict:
        res = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError as err:
            raise DeploymentError(f"flwr {' '.join(args)}: not JSON (rc {res.returncode})\n"
                                  f"{res.stdout}\n{res.stderr}") from err
        if not data.get("success", False):
            raise DeploymentError(f"flwr {' '.join(args)} failed: {data}")
        return data

    def _wait_port(self, port: int, proc: Proc, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive:
                raise DeploymentError(f"{proc.name} exited with {proc.popen.returncode}")
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise DeploymentError(f"{proc.name}: port {port} not open after {timeout} s")

    def start(self) -> "Deployment":
        t0 = time.monotonic()
        for folder in (self.logs, self.state, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["bash", str(MAKE_CERTS), str(self.certs), str(self.num_nodes)],
                       check=True, capture_output=True, env=self.env)
        self.ports["superlink"] = free_port()
        for i in range(self.num_nodes):
            self.ports[f"supernode-{i + 1}"] = free_port()
        (self.home / "config.toml").write_text(
            f"[superlink.{self.name}]\n"
            f"address = \"{LOOPBACK}:{self.ports['superlink']}\"\n"
            f"root-certificates = \"{self.certs / 'ca.crt'}\"\n")

        link = self._start("superlink", self._argv("superlink", "flower-superlink",
                                                  port=self.ports["superlink"]))
        # niced like the sites: the ServerApp it starts samples and evaluates on the CPU
        self._start("superexec-serverapp",
                    self._argv("superexec-serverapp", "flower-superexec"), nice=NODE_NICE)
        self._wait_port(self.ports["superlink"], link)
        self.timings["superlink"] = time.monotonic() - t0

        for i in range(self.num_nodes):
            data = self.flwr_json("supernode", "register", str(self.certs / f"node-{i + 1}.pub"),
                                  self.name, "--name", f"site-{i + 1}")
            self.node_ids.append(int(data["node-id"]) if "node-id" in data else -1)
        for i in range(self.num_nodes):
            self.start_node(i)
        self.wait_online(self.num_nodes, timeout=self.node_timeout)
        self.timings["start"] = time.monotonic() - t0
        return self

    def start_node(self, i: int, key: Path | None = None, port: int | None = None
                   ) -> tuple[Proc, Proc]:
        """Start SuperNode ``i`` (0-based) and its SuperExec; ``key`` replaces its key."""
        if port is not None:
            self.ports[f"supernode-{i + 1}"] = port
        argv = self._argv(self._service("supernode", i), "flower-supernode", node=i,
                          port=self.ports[f"supernode-{i + 1}"],
                          node_config=self.node_configs[i] if i < self.num_nodes else {})
        if key is not None:
            argv[argv.index("--auth-supernode-private-key") + 1] = str(key)
        node = self._start(f"supernode-{i + 1}", argv, nice=NODE_NICE)
        execu = self._start(f"superexec-clientapp-{i + 1}",
                            self._argv(self._service("superexec-clientapp", i),
                                       "flower-superexec", node=i), nice=NODE_NICE)
        if i < len(self.nodes):
            self.nodes[i], self.node_execs[i] = node, execu
        else:
            self.nodes.append(node)
            self.node_execs.append(execu)
        return node, execu

    def start_unlisted_node(self, key: Path, node_config: dict | None = None) -> Proc:
        """A SuperNode (no SuperExec) with the compose flags and ``key`` as its private
        key, on a fresh port; it is not one of ``self.nodes`` (for negative tests)."""
        i = self.num_nodes
        argv = self._argv(self._service("supernode", i), "flower-supernode", node=i,
                          port=free_port(), node_config=node_config or {})
        argv[argv.index("--auth-supernode-private-key") + 1] = str(key)
        return self._start(f"unlisted-supernode-{len(self.procs)}", argv, nice=NODE_NICE)

    def supernodes(self) -> list[dict]:
        return self.flwr_json("supernode", "list", self.name)["nodes"]

    def wait_online(self, count: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        nodes: list[dict] = []
        while time.monotonic() < deadline:
            dead = [p.name for p in self.nodes if not p.alive]
            if dead:
                raise DeploymentError(f"exited: {dead}")
            nodes = [n for n in self.supernodes() if n["status"] == "online"]
            if len(nodes) >= count:
                return nodes
            time.sleep(1)
        raise DeploymentError(f"{len(nodes)}/{count} SuperNodes online after {timeout} s")

    def run(self, run_config: dict[str, Any], app: Path = ROOT) -> int:
        """``flwr run APP NAME --run-config "k=v ..."``; returns the run id."""
        data = self.flwr_json("run", str(app), self.name, "--run-config",
                              config_string(run_config))
        return int(data["run-id"])

    def status(self, run_id: int) -> dict:
        return self.flwr_json("list", self.name, "--run-id", str(run_id))["runs"][0]

    def wait(self, run_id: int, timeout: float, poll: float = 15.0) -> str:
        """Poll ``flwr list --run-id`` until the run is finished; its final status. Every
        poll starts a ``flwr`` process: polled every 3 s, that was 2.6 s of CPU every 6-9 s
        (the SuperLink's log) for the whole run, on a 2-core host (see NODE_NICE)."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            status = self.status(run_id)["status"]
            if status.startswith("finished"):
                return status
            if not self.procs[0].alive:
                raise DeploymentError("the SuperLink exited during the run")
            time.sleep(poll)
        raise DeploymentError(f"run {run_id} still {status!r} after {timeout} s")

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` (0-based), its SuperExec and their ClientApps."""
        self.nodes[i].kill()
        self.node_execs[i].kill()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()

    def report(self, lines: int = 30) -> str:
        out = []
        for proc in self.procs:
            state = "running" if proc.alive else f"exit {proc.popen.returncode}"
            out.append(f"==== {proc.name} ({state}): {' '.join(proc.argv)}\n{proc.tail(lines)}")
        return "\n".join(out)

    def __enter__(self) -> "Deployment":
        try:
            return self.start()
        except BaseException:
            print(self.report(), file=sys.stderr)
            self.stop()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            print(self.report(), file=sys.stderr)
        self.stop()
