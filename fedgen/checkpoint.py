"""The server's checkpoint: everything a killed run needs to go on, in one file.

After every round the strategy writes ``<out>/checkpoint.pkl`` atomically (a temporary
file, then a rename: a kill, even SIGKILL, leaves the previous checkpoint or the new one,
never half of one). It holds the config, the last finished server round, the global
parameters Flower would hand the next round, the strategy's own state (global UNet, EMA,
server-optimiser moments, histograms, synthetic batches and plans: whatever the method
declares in ``checkpoint_attrs``) and the results recorded so far.

The file is a pickle: load only checkpoints you wrote (as with ``torch.load``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

from fedgen.config import ConfigError, RunConfig

FILENAME = "checkpoint.pkl"
VERSION = 1
# Keys that may differ between a run and its resumption: where it writes, and the
# resumption itself.
NOT_COMPARED = ("out-dir", "resume-from")


def save(folder: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``folder/checkpoint.pkl`` atomically."""
    path = Path(folder) / FILENAME
    tmp = path.with_name(FILENAME + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump({"version": VERSION, **state}, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def peek(folder: str | Path) -> dict[str, Any] | None:
    """The checkpoint of ``folder`` as it is now, or None while there is none (for
    watching a running run: no checks, no errors)."""
    try:
        with open(Path(folder) / FILENAME, "rb") as fh:
            return pickle.load(fh)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def load(folder: str | Path) -> dict[str, Any]:
    """The checkpoint of ``folder``; a ConfigError (one line) when there is none, it is
    unreadable, or the run it belongs to has finished."""
    folder = Path(folder)
    path = folder / FILENAME
    if not folder.is_dir():
        raise ConfigError(f"resume: {folder} is not a folder (give the output folder of the "
                          f"run to continue)")
    if not path.is_file():
        raise ConfigError(f"resume: {folder} holds no checkpoint ({FILENAME}); only runs "
                          f"that finished at least one round can be resumed")
    try:
        with open(path, "rb") as fh:
            state = pickle.load(fh)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"resume: cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ConfigError(f"resume: {path} is not a fedgen checkpoint of version {VERSION}")
    if state.get("finished"):
        raise ConfigError(f"resume: the run in {folder} has finished (round "
                          f"{state['round']} of {state['rounds']}); nothing to resume")
    return state


def config_differences(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """``key: saved -> given`` for every compared key whose value differs."""
    return [f"{k}: {saved.get(k)!r} -> {given.get(k)!r}"
            for k in sorted(set(saved) | set(given))
            if k not in NOT_COMPARED and saved.get(k) != given.get(k)]


def resume_config(folder: str | Path, given: RunConfig | None = None
                  ) -> tuple[RunConfig, dict[str, Any]]:
    """The config to continue ``folder``'s run with, and its checkpoint. ``given`` (a
    config the user passed as well) must equal the saved one on every key but
    :data:`NOT_COMPARED`; otherwise a ConfigError names the differing keys."""
    state = load(folder)
    saved = RunConfig.from_mapping(state["config"])
    if given is not None:
        diff = config_differences(saved.to_mapping(), given.to_mapping())
        if diff:
            raise ConfigError(f"resume: the config differs from the one the run in {folder} "
                              f"was started with ({'; '.join(diff)}); drop --config/--set "
                              f"to continue with the saved one")
    out = str(Path(folder).resolve())
    return saved.replace(out_dir=out, resume_from=out), state
