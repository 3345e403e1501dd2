# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Command-line flags shared by the training scripts, and config fields as flags."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import math
import os
import types
import typing

from .errors import UsageError, add_debug_arg


REPORT_TO_CHOICES = ("none", "tensorboard", "trackio", "wandb", "all")


class Number:
    """An argparse `type` for a number in a range: `Number(int, minimum=1)`, `Number(float, above=0)`,
    `Number(float, minimum=0, below=1)`. NaN and infinities are refused; a value outside the range is refused with a
    message that names what is allowed, which argparse prints after the flag's name (exit status 2)."""

    def __init__(self, kind=float, *, minimum=None, above=None, maximum=None, below=None):
        self.kind, self.minimum, self.above, self.maximum, self.below = kind, minimum, above, maximum, below
        self.__name__ = kind.__name__  # argparse names the type in its own messages

    @property
    def lowest(self):
        """The lower bound (inclusive or not), or None."""
        return self.minimum if self.minimum is not None else self.above

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        bounds = [f">= {self.minimum}" if self.minimum is not None else None,
                  f"> {self.above}" if self.above is not None else None,
                  f"<= {self.maximum}" if self.maximum is not None else None,
                  f"< {self.below}" if self.below is not None else None]
        bounds = [bound for bound in bounds if bound]
        return f"{noun} {' and '.join(bounds)}" if bounds else f"a finite {noun[2:] if self.kind is int else 'number'}"

    def __call__(self, text):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        inside = math.isfinite(value) and all((
            self.minimum is None or value >= self.minimum, self.above is None or value > self.above,
            self.maximum is None or value <= self.maximum, self.below is None or value < self.below))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def __repr__(self):
        return f"Number({self.describe()})"


POSITIVE_INT = Number(int, minimum=1)
NON_NEGATIVE_INT = Number(int, minimum=0)
POSITIVE_FLOAT = Number(float, above=0)
NON_NEGATIVE_FLOAT = Number(float, minimum=0)
FINITE_FLOAT = Number(float)
SEED = Number(int, minimum=0, maximum=2**32 - 1)  # NumPy's seeds
PROBABILITY = Number(float, above=0, below=1)
PERCENTAGE = Number(float, minimum=0, below=100)


def add_common_args(parser: argparse.ArgumentParser, *, defaults: dict | None = None) -> None:
    """Adds the flags every training script shares (named as in the HF example scripts).

    `defaults` overrides the default of any of these flags for one script, e.g. `{"learning_rate": 2e-4}`.
    """
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", type=str, default=None, help="Local folder with the training images.")
    group.add_argument(
        "--dataset_name", type=str, default=None, help="Name of a dataset on the Hub (used when --data_dir is not set)."
    )
    group.add_argument("--image_size", type=POSITIVE_INT, default=None,
                       help="Images are resized to this size (pixels).")
    group.add_argument(
        "--dataloader_num_workers", type=NON_NEGATIVE_INT, default=0,
        help="Worker processes for data loading (0: main process).",
    )

    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, default="outputs", help="Where checkpoints, logs and the model go.")
    group.add_argument("--model_name_or_path", type=str, default=None,
                       help="Start from a saved model (local folder or Hub id) instead of a fresh one.")
    group.add_argument("--num_train_epochs", type=POSITIVE_INT, default=1,
                       help="Number of passes over the training data.")
    group.add_argument(
        "--max_train_steps", type=POSITIVE_INT, default=None,
        help="Stop after this many optimisation steps (for smoke runs).",
    )
    group.add_argument("--per_device_train_batch_size", type=POSITIVE_INT, default=8, help="Batch size per device.")
    group.add_argument("--learning_rate", type=POSITIVE_FLOAT, default=1e-3, help="Initial learning rate.")
    group.add_argument("--seed", type=SEED, default=42, help="Seed for Python, NumPy and torch (all devices).")
    group.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "fp16", "bf16"],
        help="Mixed precision mode of `accelerate`.",
    )

    group.add_argument(
        "--fast_path", type=auto_bool, default="true",
        help="true: the fast step where the device has one (fused optimizer kernels, CUDA graphs, the script's own "
        "speed-ups); false: the plain eager step. The maths is the same.",
    )
    group.add_argument(
        "--cuda_graphs", type=auto_bool, default="auto",
        help="Replay the training step as CUDA graphs after a few eager warm-up steps, so a step costs no host work "
        "(auto: on for one CUDA process on the fast path; true needs one process on a CUDA device).",
    )

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument(
        "--logging_steps", type=POSITIVE_INT, default=25,
        help="Fetch the losses from the device every N steps (every step is still logged; larger = fewer syncs).",
    )
    group.add_argument(
        "--checkpointing_steps",
        type=str,
        default=None,
        help="Save a checkpoint every N steps (an integer), at the end of every epoch ('epoch'), after each given "
        "duration of training such as '10min' (checked between steps; the end of training then saves only the "
        "model), or never ('no').",
    )
    group.add_argument(
        "--checkpoints_total_limit", type=POSITIVE_INT, default=None,
        help="Keep at most this many checkpoints (oldest go).",
    )
    group.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="Replace the run in --output_dir: its outputs (model, checkpoints, metrics, samples/, anomaly/, ...) are "
        "deleted first, other files stay. Without it (or --resume_from_checkpoint) a folder holding a run is refused.",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Resume from a checkpoint folder, or 'latest' for the newest one in <output_dir>/checkpoints.",
    )
    group.add_argument(
        "--report_to",
        type=str,
        default="none",
        choices=list(REPORT_TO_CHOICES),
        help="Experiment trackers to log to, besides the metrics.jsonl file that is always written.",
    )

    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload checkpoints and the final model to the Hub.")
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Repository on the Hub, e.g. 'user/maf-capsule'."
    )
    group.add_argument(
        "--hub_token", type=str, default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)."
    )
    group.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")
    add_debug_arg(parser)

    if defaults:
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"add_common_args got defaults for unknown flags {unknown}; known flags: {sorted(known)}.")
        parser.set_defaults(**defaults)


def checkpointing_interval(value: str | None) -> str | int | float | None:
    """Parses `--checkpointing_steps`: "epoch"; a positive step count (int); a duration of training such as "90s",
    "10min" or "1h" (float seconds, checked between steps); or "no" / "none" for no checkpoints at all (returned as
    "no"). None (the flag left out) stays None."""
    if value is None or value == "epoch":
        return value
    text = str(value).strip().lower()
    if text in ("no", "none"):
        return "no"
    if text.isdigit() and int(text) > 0:
        return int(text)
    for suffix, seconds in (("min", 60.0), ("s", 1.0), ("h", 3600.0)):
        number = text[: -len(suffix)]
        if text.endswith(suffix) and number.replace(".", "", 1).isdigit() and float(number) > 0:
            return float(number) * seconds
    raise ValueError(f"--checkpointing_steps must be 'epoch', a positive number of steps, a duration such as '10min' "
                     f"or '90s', or 'no'; got {value!r}.")


def auto_bool(value) -> str:
    """Parses an auto / true / false flag (kept as that string: 'auto' is resolved once the device is known)."""
    lowered = str(value).lower()
    if lowered not in ("auto", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return lowered


def finish_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks and completes the common flags the same way for every script; errors go through `parser.error`."""
    if args.data_dir is None and args.dataset_name is None:
        parser.error("pass --data_dir (a local folder of images) or --dataset_name (a Hub dataset id).")
    if args.push_to_hub and not args.hub_model_id:
        # As the transformers examples: the repository is named after the output folder.
        args.hub_model_id = os.path.basename(os.path.abspath(args.output_dir))
    if args.num_train_epochs < 1:
        parser.error("--num_train_epochs must be at least 1.")
    if args.logging_steps < 1:
        parser.error("--logging_steps must be positive.")
    try:
        args.checkpointing_steps = checkpointing_interval(args.checkpointing_steps)
    except ValueError as error:
        parser.error(str(error))
    return args


def _str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _flag_type(default, annotation):
    """(element type, is_list) of a config field, from its default value, else from its annotation."""
    if isinstance(default, bool):
        return _str2bool, False
    if isinstance(default, (int, float, str)):
        return type(default), False
    if isinstance(default, (list, tuple)):
        element = type(default[0]) if default else str
        return (_str2bool if element is bool else element), True

    # Default is None (or unusual): read `int | None`, `list[int] | None`, `Optional[float]`...
    if isinstance(annotation, str) or annotation is inspect.Parameter.empty:
        return str, False
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    for candidate in candidates:
        if candidate is bool:
            return _str2bool, False
        if candidate in (int, float, str):
            return candidate, False
        if typing.get_origin(candidate) in (list, tuple):
            args = [arg for arg in typing.get_args(candidate) if arg is not Ellipsis]
            element = args[0] if args and args[0] in (int, float, str, bool) else str
            return (_str2bool if element is bool else element), True
    return str, False


_ANNOTATION_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "tuple": tuple, "dict": dict,
                     "None": None, "Optional": typing.Optional, "Union": typing.Union}


def _fields_from_source(reference: str) -> list[inspect.Parameter]:
    """The `__init__` parameters of the config class named by `reference` ("package.module:ClassName"), read from its
    source without importing it (importing a config imports transformers and torch, seconds that `--help` should
    not wait for). Defaults must be literals; annotations are read as the few types flags use."""
    module_name, class_name = reference.split(":")
    package, _, rest = module_name.partition(".")
    spec = importlib.util.find_spec(package)  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"Cannot find the package {package} for {reference}.")
    path = os.path.join(spec.submodule_search_locations[0], *rest.split(".")) + ".py"
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    node = classes[class_name]
    while True:
        init = next((item for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)
        arguments = init.args.args[1:] if init else []
        if arguments or not node.bases or not isinstance(node.bases[0], ast.Name) or node.bases[0].id not in classes:
            break
        node = classes[node.bases[0].id]  # an __init__(self, **kwargs) of a subclass: its base's fields
    defaults = [inspect.Parameter.empty] * (len(arguments) - len(init.args.defaults)) + list(init.args.defaults)
    fields = []
    for argument, default in zip(arguments, defaults):
        if default is not inspect.Parameter.empty:
            default = ast.literal_eval(default)
        annotation = inspect.Parameter.empty
        if argument.annotation is not None:
            try:
                annotation = eval(ast.unparse(argument.annotation), {"__builtins__": {}}, _ANNOTATION_NAMES)
            except Exception:  # a type flags do not use (the field then reads as a string)
                annotation = ast.unparse(argument.annotation)
        fields.append(inspect.Parameter(argument.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=annotation))
    return fields


def _config_fields(config_class) -> list[inspect.Parameter]:
    """The fields of a config class, or of the class a "package.module:ClassName" string names (read from source)."""
    if isinstance(config_class, str):
        return _fields_from_source(config_class)
    signature = inspect.signature(config_class.__init__)
    return [
        parameter
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]


def _class_name(config_class) -> str:
    return config_class.split(":")[-1] if isinstance(config_class, str) else config_class.__name__


def add_config_override_args(parser: argparse.ArgumentParser, config_class, skip: tuple = (),
                             script_defaults: dict | None = None) -> None:
    """Adds one `--<field>` flag per field of `config_class.__init__`, defaulting to None (= keep the config's).

    `config_class` is the class or, so that building the parser (and `--help`) imports nothing heavy, the string
    "package.module:ClassName" (its fields are then read from the source). Types come from the field's default
    (int/float/str; a list becomes `nargs="+"`; a bool reads true/false, and a bare `--flag` means true); an integer
    must be >= 0 and a float finite, at parse time, and the config's own checks run in `check_config_overrides`.
    Fields named in `skip` or already defined on the parser (e.g. a common `--image_size`) get no flag; the script
    handles those itself. `script_defaults` names fields the script sets itself when the flag is not given (the flag
    still defaults to None here); their help says so next to the config's default.
    """
    name = _class_name(config_class)
    group = parser.add_argument_group(f"{name} overrides")
    added = []
    for parameter in _config_fields(config_class):
        option = f"--{parameter.name}"
        if parameter.name in skip or option in parser._option_string_actions:
            continue
        element_type, is_list = _flag_type(parameter.default, parameter.annotation)
        element_type = {int: NON_NEGATIVE_INT, float: FINITE_FLOAT}.get(element_type, element_type)
        kwargs = {"type": element_type, "default": None}
        if is_list:
            kwargs["nargs"] = "+"
        elif element_type is _str2bool:
            kwargs.update(nargs="?", const=True)
        default = parameter.default
        defaults = [] if default is inspect.Parameter.empty else [f"config default: {default!r}"]
        if parameter.name in (script_defaults or {}):
            defaults.insert(0, f"default here: {script_defaults[parameter.name]!r}")
        default_text = f" ({'; '.join(defaults)})" if defaults else ""
        group.add_argument(option, help=f"Overrides `{name}.{parameter.name}`{default_text}.",
                           **kwargs)
        added.append(parameter.name)

    # Remember which flags belong to the config, so fields skipped here never leak into the overrides.
    registry = dict(parser.get_default("_config_override_fields") or {})
    registry[name] = added
    parser.set_defaults(_config_override_fields=registry)


def _flags_text(values: dict) -> str:
    """`{"num_blocks": 2, "hidden_sizes": [8, 8]}` -> `--num_blocks 2 --hidden_sizes 8 8`."""
    return " ".join(f"--{name} " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
                    for name, value in values.items())


def config_overrides_from_args(args: argparse.Namespace, config_class, with_fields: dict | None = None) -> dict:
    """The config fields the user set on the command line, as keyword arguments for `config_class`.

    The values are checked by building a `config_class` from them, together with `with_fields` (fields the script
    sets from flags of its own, such as `--image_size`, which other fields are checked against): a value the config
    refuses (e.g. `--num_blocks 0`) raises `UsageError` naming the flags; those the script filled in itself (listed in
    `args._script_defaults`) are named as its defaults, not as flags the user gave. Only the overrides are returned."""
    registry = getattr(args, "_config_override_fields", None) or {}
    names = registry.get(_class_name(config_class))
    if names is None:
        names = [parameter.name for parameter in _config_fields(config_class)]
    overrides = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = list(value) if isinstance(value, (list, tuple)) else value
    if overrides:
        fixed = {name: value for name, value in (with_fields or {}).items() if value is not None}
        try:
            config_class(**fixed, **overrides)
        except ValueError as error:  # the config's own validation of its values
            defaulted = getattr(args, "_script_defaults", None) or set()
            values = {**fixed, **overrides}
            given = _flags_text({name: value for name, value in values.items() if name not in defaulted})
            by_default = _flags_text({name: value for name, value in values.items() if name in defaulted})
            sources = [f"the flags {given}"] if given else []
            if by_default:
                sources.append(f"this script's defaults {by_default} (give a flag to change one)")
            message = " ".join(str(error).split()).rstrip(".")
            raise UsageError(f"{message} (from {' and '.join(sources)}; see --help).") from error
    return overrides



def check_config_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, config_class,
                           with_fields: dict | None = None) -> dict:
    """`config_overrides_from_args`, for a script's `parse_args`: a value the config refuses is a `parser.error`
    (one line naming the flags, exit status 2) before any work. Returns the overrides."""
    try:
        return config_overrides_from_args(args, config_class, with_fields=with_fields)
    except UsageError as error:
        parser.error(str(error))
