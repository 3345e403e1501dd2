# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Loading a model for a script: `--model_name_or_path` (a local folder is checked before loading, a Hub id is asked
for only when the name cannot be a local path, and every failure is one `ModelLoadError` that names the path and the
fix), and the prologue of the inference scripts (`load_model_for_inference`: device, output folder, model).

transformers treats any name that is not an existing folder as a Hub id. A mistyped local path (`runs/mafx`) then
goes to the network, waits through its retries, and blames the connection; a folder without `config.json` or with a
truncated `model.safetensors` fails deep inside loading without naming the file. Here:

- A name that looks local and does not exist is an error at once, with the closest existing names next to it. It
  looks local when it starts with `./`, `../`, `/` or `~`, has more than one `/` (a Hub id is `name` or
  `user/name`), contains a backslash, is not a valid Hub id, or when its first part exists here as a folder
  (`runs/mafx` while `runs/` exists).
- A local folder must hold `config.json` (with a `model_type` the script can use) and weights whose safetensors
  headers cover the whole file; a training checkpoint (`checkpoints/step_N`) or a run that has not finished yet
  gets its own message.
- A name that could be a Hub id but is one typo away from a local model folder (`rnus/maf` or `runs_maf` while
  `runs/maf` exists) is an error at once too ("did you mean runs/maf?"), before any Hub call.
- A Hub id is looked up only when the Hub answers: one connection attempt with a short timeout (to the endpoint, or
  to the proxy), not the retries of the HTTP client, so no connection is one line within seconds; a model already in
  the local Hub cache then loads from there.
- A Hub id's failures (unknown repo, no connection, gated or private repo) are one line naming the id.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import socket
import threading
from urllib.parse import urlparse

from .errors import ModelLoadError


CONFIG_NAME = "config.json"
WEIGHTS_NAMES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
CHECKPOINT_STATE_NAME = "training_state.json"  # written by CheckpointManager into every checkpoint folder
# The package whose import registers each model type with the Auto classes.
MODEL_PACKAGES = {"maf": "modeling_maf", "iaf": "modeling_maf", "feature_maf": "modeling_maf",
                  "cyclegan": "modeling_cyclegan"}


def looks_local(name: str) -> bool:
    """Whether `name` can only mean a local path (see the module docstring), whether or not it exists."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    if name in (".", "..") or name.startswith(("./", "../", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in name:
        return True
    if "/" in name and os.path.isdir(name.split("/", 1)[0]):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _closest_names(path: str) -> str:
    """A hint for a path that does not exist: the closest names next to it, or what its parent holds."""
    parent, base = os.path.split(os.path.normpath(path))
    parent = parent or "."
    if not os.path.isdir(parent):
        return f"; {parent} does not exist either."
    candidates = sorted(n for n in os.listdir(parent) if not n.startswith("."))
    close = difflib.get_close_matches(base, candidates, n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(os.path.join(os.path.dirname(path), c) for c in close) + "?"
    shown = candidates[:8] + (["..."] if len(candidates) > 8 else [])
    return f"; {parent} holds {shown or 'nothing'}."


NEAR_MATCH_CUTOFF = 0.8  # difflib ratio above which a name counts as a typo of a local model folder
HUB_CONNECT_TIMEOUT = 3.0  # seconds for the one connection attempt to the Hub


def local_near_match(name: str, limit: int = 2000) -> str | None:
    """The local model folder (one holding config.json) closest to `name`, when `name` is one typo away from it:
    among the folders beside `name`'s parent and those of the current folder, one and two levels deep."""
    candidates = set()
    parent = os.path.dirname(os.path.normpath(name))
    for root in {".", os.path.dirname(parent) or "."}:
        try:
            first = sorted(entry for entry in os.listdir(root) if not entry.startswith("."))[:limit]
        except OSError:
            continue
        for entry in first:
            path = os.path.normpath(os.path.join(root, entry))
            if not os.path.isdir(path):
                continue
            candidates.add(path)
            try:
                candidates.update(os.path.normpath(os.path.join(path, sub)) for sub in os.listdir(path)[:limit]
                                  if not sub.startswith("."))
            except OSError:
                continue
    models = [path for path in candidates if os.path.isfile(os.path.join(path, CONFIG_NAME))]
    close = difflib.get_close_matches(os.path.normpath(name), models, n=1, cutoff=NEAR_MATCH_CUTOFF)
    return close[0] if close else None


def _proxy_for(url) -> tuple[str, int] | None:
    for variable in (f"{url.scheme}_proxy", f"{url.scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if os.environ.get(variable):
            proxy = urlparse(os.environ[variable])
            return proxy.hostname, proxy.port or (443 if proxy.scheme == "https" else 80)
    return None


def hub_unreachable_reason() -> str | None:
    """None when the Hub endpoint (HF_ENDPOINT, or the proxy in front of it) takes a TCP connection within
    HUB_CONNECT_TIMEOUT seconds, name resolution included; else why not, in words. Offline mode (HF_HUB_OFFLINE=1)
    is a reason too."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    url = urlparse(constants.ENDPOINT)
    host, port = _proxy_for(url) or (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    outcome = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
            outcome["ok"] = True
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(HUB_CONNECT_TIMEOUT)
    if outcome.get("ok"):
        return None
    error = outcome.get("error")
    reason = f"{type(error).__name__}: {error}" if error else f"no answer within {HUB_CONNECT_TIMEOUT:g} s"
    return f"cannot connect to {host}:{port} ({reason})"


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, CONFIG_NAME), str)


def check_model_folder(path: str, model_types: tuple[str, ...] | None = None) -> None:
    """Raises `ModelLoadError` unless `path` holds a loadable model: config.json with a usable model_type, and
    weights whose safetensors files are complete."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        if os.path.isfile(os.path.join(path, CHECKPOINT_STATE_NAME)):
            raise ModelLoadError(
                f"{path} is a training checkpoint (the accelerate state for resuming), not a saved model: resume "
                f"training from it with --resume_from_checkpoint {path}, or pass the run's output folder, where "
                "training writes the model (config.json, model.safetensors) when it ends."
            )
        if os.path.isdir(os.path.join(path, "checkpoints")):
            raise ModelLoadError(
                f"{path} holds checkpoints but no model ({CONFIG_NAME}): training there has not finished. Finish it "
                f"with the same command plus --resume_from_checkpoint latest, and the model is written into {path}."
            )
        models = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n, CONFIG_NAME)))
        if models:
            raise ModelLoadError(
                f"{path} holds no {CONFIG_NAME}, so it is not a saved model; the model folders in it are "
                f"{', '.join(os.path.join(path, n) for n in models)}: pass one of those."
            )
        present = sorted(n for n in os.listdir(path) if not n.startswith("."))
        raise ModelLoadError(
            f"{path} holds no {CONFIG_NAME}, so it is not a saved model (it has "
            f"{present[:8] + (['...'] if len(present) > 8 else []) or 'nothing'}). Pass the folder a training script "
            "wrote (config.json and model.safetensors), or a Hub id such as user/maf-capsule."
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_path} is not readable JSON ({error}); copy the model folder again.") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelLoadError(
            f"{config_path} has no model_type, so it was not written by save_pretrained; pass the folder a training "
            "script wrote."
        )
    _check_model_type(path, model_type, model_types)
    weights = [name for name in WEIGHTS_NAMES if os.path.isfile(os.path.join(path, name))]
    if not weights:
        raise ModelLoadError(
            f"{path} has {CONFIG_NAME} but no weights ({' or '.join(WEIGHTS_NAMES[::2])}): the save was interrupted "
            "or the folder was copied without them; copy the whole folder again or save the model again."
        )
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), framework="pt"):
                    pass  # opening checks the header and that the data covers the file exactly
            except (SafetensorError, OSError) as error:
                raise ModelLoadError(
                    f"{os.path.join(path, name)} is damaged or truncated ({error}): copy it again from where the "
                    "model was saved, or save the model again."
                ) from error


def _check_model_type(where: str, model_type: str, model_types: tuple[str, ...] | None) -> None:
    if model_types and model_type not in model_types:
        raise ModelLoadError(
            f"{where} is a '{model_type}' model; this script needs {' or '.join(repr(t) for t in model_types)}."
        )


def resolve_model_path(name_or_path: str, model_types: tuple[str, ...] | None = None, token=None) -> str:
    """What to pass to `from_pretrained` for `name_or_path`: a checked local folder (with `~` expanded), or a Hub id
    whose config was fetched and checked. Raises `ModelLoadError` naming the path and the fix; a name that looks
    local (see `looks_local`) is never sent to the Hub."""
    name = str(name_or_path)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        check_model_folder(path, model_types)
        return path
    if os.path.exists(path):
        raise ModelLoadError(
            f"{name} is a file; pass the folder that holds config.json and the weights"
            f" ({os.path.dirname(os.path.abspath(path))} if this file is in it)."
        )
    if looks_local(name):
        raise ModelLoadError(
            f"{name} does not exist (looked in {os.path.abspath(path)}){_closest_names(path)} Check the path; a Hub id "
            "is 'name' or 'user/name' whose first part is not a folder here."
        )
    near = local_near_match(name)
    if near is not None:
        raise ModelLoadError(
            f"{name} is not a folder here; did you mean {near}? (A name this close to a local model folder is not "
            "looked up on the Hub: check the path, or run from a folder without it to use the Hub repo.)"
        )
    offline = hub_unreachable_reason()
    if offline is not None and not _in_hub_cache(name):
        raise ModelLoadError(
            f"{name} is not a folder here, and the Hub cannot be reached to look it up: {offline}. Check the path of "
            "the local model folder, or the connection (HF_ENDPOINT, a proxy)."
        )

    from transformers import PreTrainedConfig

    try:
        config, _ = PreTrainedConfig.get_config_dict(name, token=token, local_files_only=offline is not None)
    except (OSError, ValueError) as error:  # transformers turns every Hub failure into an OSError
        first = " ".join(str(error).split())
        raise ModelLoadError(
            f"{name} is not a folder here, and loading it as a Hub id failed: {first} Check the id (and the token "
            "for a private or gated repo), or pass the path of a local model folder."
        ) from error
    if not config.get("model_type"):
        raise ModelLoadError(f"The config.json of the Hub repo {name} has no model_type; it is not a saved model.")
    _check_model_type(f"The Hub repo {name}", config["model_type"], model_types)
    return name


def load_pretrained(model_class, name_or_path: str, *, model_types: tuple[str, ...] | None = None, token=None,
                    **kwargs):
    """`model_class.from_pretrained` (a model class or an Auto class) for a local folder or a Hub id, checked by
    `resolve_model_path` first; loading errors become one `ModelLoadError` naming the path."""
    from safetensors import SafetensorError

    source = resolve_model_path(name_or_path, model_types=model_types, token=token)
    if source == str(name_or_path) and not os.path.isdir(source) and hub_unreachable_reason() is not None:
        kwargs.setdefault("local_files_only", True)  # a Hub model in the local cache, with the Hub out of reach
    try:
        return model_class.from_pretrained(source, token=token, **kwargs)
    except (SafetensorError, OSError) as error:
        if isinstance(error, ModelLoadError):
            raise
        raise ModelLoadError(
            f"Cannot load the model in {name_or_path}: {' '.join(str(error).split())} Copy or save the model again."
        ) from error


def resolve_device(name: str | None = None):
    """The device an inference script runs on: `name` (e.g. from --device), else CUDA when available, else CPU."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model_for_inference(args: argparse.Namespace, default_subfolder: str,
                             model_types: tuple[str, ...] | None = None):
    """The prologue of the inference scripts: the device of ``--device``, the output folder (``--output_dir``, else
    ``default_subfolder`` inside the model folder; created) and the model of ``--model_name_or_path`` (local folder
    or Hub id, through the Auto classes, checked by `load_pretrained`: a wrong path or a model of another type than
    ``model_types`` is one `ModelLoadError`) on that device in eval mode. Returns ``(device, output_dir, model)``.
    The model is loaded before the output folder is created, so a wrong path leaves nothing behind."""
    resolve_model_path(args.model_name_or_path, model_types=model_types, token=args.hub_token)  # fails fast
    for model_type in model_types or MODEL_PACKAGES:  # registers the model types with the Auto classes
        importlib.import_module(MODEL_PACKAGES[model_type])
    from transformers import AutoModel

    device = resolve_device(args.device)
    model = load_pretrained(AutoModel, args.model_name_or_path, model_types=model_types, token=args.hub_token)
    model = model.to(device).eval()
    output_dir = args.output_dir or os.path.join(os.path.expanduser(args.model_name_or_path), default_subfolder)
    os.makedirs(output_dir, exist_ok=True)
    return device, output_dir, model

