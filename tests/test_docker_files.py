"""docker/ checked without a Docker engine: compose syntax, host paths, version pins, every
flag against the installed Flower CLI, and the certificates make-certs.sh produces."""

from __future__ import annotations

import functools
import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DOCKER = ROOT / "docker"
COMPOSE_FILES = sorted(DOCKER.glob("compose*.yml"))
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if p.suffix != ".dockerignore")
MAKE_CERTS = DOCKER / "make-certs.sh"
FLWR_VERSION = importlib.metadata.version("flwr")
IMAGE_BINARY = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
                "flwr/superexec": "flower-superexec"}


def load(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def services() -> dict[str, dict]:
    return load(DOCKER / "compose.yml")["services"]


@functools.lru_cache(maxsize=None)
def certs_made(tmp: str) -> set[str]:
    subprocess.run(["bash", str(MAKE_CERTS), tmp, "3"], check=True, capture_output=True)
    return {p.name for p in Path(tmp).iterdir()}


@functools.lru_cache(maxsize=None)
def cli_help(binary: str) -> str:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed")
    res = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def entrypoint(dockerfile: Path) -> str:
    match = re.search(r'^ENTRYPOINT \["([^"]+)"', dockerfile.read_text(), re.M)
    assert match, f"{dockerfile}: no exec-form ENTRYPOINT"
    return match.group(1)


def binary_of(service: dict) -> str:
    if "build" in service:
        build = service["build"]
        return entrypoint(DOCKER / build["context"] / build["dockerfile"])
    return IMAGE_BINARY[service["image"].split(":")[0]]


def test_compose_files_parse():
    assert (DOCKER / "compose.yml") in COMPOSE_FILES
    for path in COMPOSE_FILES:
        data = load(path)
        assert isinstance(data.get("services"), dict) and data["services"], path


def test_compose_shape():
    svc = services()
    nodes = sorted(n for n in svc if re.fullmatch(r"supernode-\d+", n))
    assert nodes == ["supernode-1", "supernode-2", "supernode-3"]
    link = [str(a) for a in svc["superlink"]["command"]]
    for flag in ("--enable-supernode-auth", "--ssl-certfile", "--ssl-keyfile",
                 "--ssl-ca-certfile", "--database", "--disable-runtime-dependency-installation"):
        assert flag in link
    assert link[link.index("--isolation") + 1] == "process"
    assert "--insecure" not in link
    state_dir = str(Path(link[link.index("--database") + 1]).parent)
    assert any(v.startswith("superlink-state:") and v.split(":")[1] == state_dir
               for v in svc["superlink"]["volumes"])
    assert "superlink-state" in load(DOCKER / "compose.yml")["volumes"]
    data_mounts = set()
    for k, name in enumerate(nodes, start=1):
        cmd = [str(a) for a in svc[name]["command"]]
        assert cmd[cmd.index("--isolation") + 1] == "process"
        assert "--insecure" not in cmd and "--root-certificates" in cmd
        key = cmd[cmd.index("--auth-supernode-private-key") + 1]
        node_config = cmd[cmd.index("--node-config") + 1]
        assert f'node-name="site-{k}"' in node_config and 'data-dir="/app/data"' in node_config
        # the key file is this node's own secret
        secret = next(s for s in svc[name]["secrets"] if s["target"] == key)
        assert load(DOCKER / "compose.yml")["secrets"][secret["source"]]["file"] == \
            f"./certs/node-{k}"
        # one SuperExec per SuperNode, reading the site's data read-only
        execu = svc[f"superexec-clientapp-{k}"]
        ecmd = [str(a) for a in execu["command"]]
        assert ecmd[ecmd.index("--runtime-api-address") + 1] == f"{name}:9094"
        mount = next(v for v in execu["volumes"] if v.split(":")[1] == "/app/data")
        assert mount.endswith(":ro")
        data_mounts.add(mount.split(":")[0])
    assert len(data_mounts) == len(nodes)  # each site its own folder
    scmd = [str(a) for a in svc["superexec-serverapp"]["command"]]
    assert scmd[scmd.index("--runtime-api-address") + 1] == "superlink:8000"


def test_every_host_path_exists(tmp_path):
    made = certs_made(str(tmp_path / "certs"))
    for path in COMPOSE_FILES:
        data = load(path)
        base = DOCKER
        named = set(data.get("volumes") or {}) | set(load(DOCKER / "compose.yml")["volumes"])
        for name, svc in data["services"].items():
            build = svc.get("build")
            if isinstance(build, dict) and "context" in build:
                context = (base / build["context"]).resolve()
                assert context.is_dir(), (name, context)
                assert (context / build["dockerfile"]).is_file(), (name, build)
            for volume in svc.get("volumes", []):
                source = volume.split(":")[0]
                if source in named:
                    continue
                assert source.startswith("."), (name, volume)
                assert (base / source).exists(), (name, volume)
        for secret in (data.get("secrets") or {}).values():
            file = base / secret["file"]
            # secrets are written by make-certs.sh into docker/certs/ (kept, empty, in git)
            assert file.parent.is_dir(), secret
            assert file.exists() or file.name in made, (secret, sorted(made))


def test_images_pin_installed_flwr():
    tags = []
    for path in COMPOSE_FILES:
        for name, svc in load(path)["services"].items():
            if "image" in svc and svc["image"].startswith("flwr/"):
                tags.append((name, svc["image"]))
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("FROM "):
                tags.append((dockerfile.name, line.split()[1]))
            if line.startswith("ARG FLWR_VERSION="):
                assert line.split("=", 1)[1] == FLWR_VERSION, line
    assert tags
    for where, tag in tags:
        image, _, version = tag.partition(":")
        assert image in IMAGE_BINARY, (where, tag)
        assert version == FLWR_VERSION or version.startswith(FLWR_VERSION + "-"), (where, tag)


def test_dockerfile_installs_app_without_ray():
    text = (DOCKER / "Dockerfile").read_text()
    for part in ("pyproject.toml", "fedgen", "strategies", "clients", "configs"):
        assert re.search(rf"^COPY .*\b{part}\b", text, re.M), part
    assert "TORCH_INDEX_URL" in text and "flwr\\[simulation\\]" in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text


def test_dockerfile_pyproject_edit_drops_simulation_extra(tmp_path):
    """The sed in the Dockerfile turns flwr[simulation] into plain flwr in pyproject."""
    text = (DOCKER / "Dockerfile").read_text()
    sed = re.search(r"sed -i '([^']+)' pyproject.toml", text).group(1)
    copy = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", copy)
    subprocess.run(["sed", "-i", sed, str(copy)], check=True)
    edited = copy.read_text()
    assert "flwr[simulation]" not in edited
    assert re.search(r'"flwr[><=]', edited)


@pytest.mark.parametrize("name", sorted(services()))
def test_command_flags_accepted_by_installed_cli(name):
    svc = services()[name]
    if "command" not in svc:
        return
    binary = binary_of(svc)
    options = help_options(cli_help(binary))
    flags = [str(a).split("=")[0] for a in svc["command"] if str(a).startswith("--")]
    assert flags
    unknown = [f for f in flags if f not in options]
    assert not unknown, f"{name}: {binary} does not accept {unknown}"
    deprecated = [f for f in flags if "deprecated" in options[f].lower()]
    assert not deprecated, f"{name}: deprecated in {binary}: {deprecated}"


def help_options(help_text: str) -> dict[str, str]:
    """argparse --help: each option (every alias) -> its help text."""
    options: dict[str, str] = {}
    blocks = re.split(r"\n(?=  -)", help_text.split("options:", 1)[1])
    for block in blocks:
        head = block.strip().split("  ")[0]
        for flag in re.findall(r"--[a-z0-9][a-z0-9-]*", head):
            options[flag] = block
    return options


def test_make_certs(tmp_path):
    out = tmp_path / "certs"
    res = subprocess.run(["bash", str(MAKE_CERTS), str(out), "2", "10.1.2.3", "link.example"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in ("ca.crt", "ca.key", "server.pem", "server.key",
                 "node-1", "node-1.pub", "node-2", "node-2.pub"):
        assert (out / name).is_file(), name
    assert not (out / "node-3").exists()
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"),
                             str(out / "server.pem")], capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr
    san = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout",
                          "-ext", "subjectAltName"], capture_output=True, text=True,
                         check=True).stdout
    for entry in ("DNS:localhost", "DNS:superlink", "IP Address:127.0.0.1",
                  "IP Address:10.1.2.3", "DNS:link.example"):
        assert entry in san, san
    assert (out / "node-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    # Flower 1.41 loads the private key as an elliptic-curve SSH key
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    key = load_ssh_private_key((out / "node-1").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    # idempotent: a second call keeps the CA, adds missing node keys only
    before = (out / "ca.crt").read_bytes(), (out / "node-1").read_bytes()
    res = subprocess.run(["bash", str(MAKE_CERTS), str(out), "3"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert ((out / "ca.crt").read_bytes(), (out / "node-1").read_bytes()) == before
    assert (out / "node-3.pub").is_file()


@pytest.mark.parametrize("args", [[], ["out", "zero"], ["out", "0"], ["--help"]])
def test_make_certs_usage(tmp_path, args):
    res = subprocess.run(["bash", str(MAKE_CERTS), *args], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 2
    assert "usage:" in res.stderr
    assert not (tmp_path / "out").exists()
