"""Every config in configs/ agrees with its model's defaults, or says where it does not: a model argument whose value
differs from the module's default carries the comment ``# differs from the default: <reason>`` on its line (or on a
line of its value, for a nested value such as the optimizer), and a comment saying so on a default value is stale."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
MARKER = "# differs from the default:"


def normalized(value: Any) -> Any:
    """YAML's view of a Python value: tuples are lists."""
    if isinstance(value, (list, tuple)):
        return [normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    return value


def resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def callable_config(value: Any) -> dict[str, Any]:
    """A class given as a callable (a class, a ``class_path`` mapping) with every argument resolved to its value."""
    if isinstance(value, dict):
        path, init_args = value["class_path"], dict(value.get("init_args") or {})
    else:
        path, init_args = f"{value.__module__}.{value.__qualname__}", {}
    parameters = inspect.signature(resolve(path)).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return {"class": resolve(path), "init_args": normalized({**defaults, **init_args})}


def model_defaults(class_path: str) -> dict[str, Any]:
    """The model's constructor defaults; an optimizer left None stands for the module's ``DEFAULT_OPTIMIZER``."""
    cls = resolve(class_path)
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}
    if defaults.get("optimizer") is None and "optimizer" in defaults:
        defaults["optimizer"] = importlib.import_module(cls.__module__).DEFAULT_OPTIMIZER
    return defaults


def differs(key: str, value: Any, default: Any) -> bool:
    if key == "optimizer" and value is not None and default is not None:
        return callable_config(value) != callable_config(default)
    return normalized(value) != normalized(default)


def unexplained(text: str) -> list[str]:
    """``key: value (default ...)`` for each model argument of the config ``text`` that differs from the default without
    the marker comment, and ``key: marked but equal to the default`` for each stale marker."""
    lines = text.splitlines()
    model = yaml.safe_load(text)["model"]
    defaults = model_defaults(model["class_path"])
    root = yaml.compose(text)
    model_node = next(v for k, v in root.value if k.value == "model")
    args_node = next(v for k, v in model_node.value if k.value == "init_args")
    problems = []
    for key_node, value_node in args_node.value:
        key = key_node.value
        if key not in defaults:
            problems.append(f"{key}: not an argument of {model['class_path']}")
            continue
        last = value_node.end_mark.line - (value_node.end_mark.column == 0)
        span = lines[key_node.start_mark.line : max(last, key_node.start_mark.line) + 1]
        marked = any(MARKER in line for line in span)
        value = model["init_args"][key]
        if differs(key, value, defaults[key]) and not marked:
            problems.append(f"{key}: {value!r} (default {defaults[key]!r}) without '{MARKER} <reason>'")
        elif marked and not differs(key, value, defaults[key]):
            problems.append(f"{key}: marked '{MARKER}' but equal to the default")
    return problems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_says_where_it_differs_from_the_model_defaults(path: Path) -> None:
    assert unexplained(path.read_text()) == []


def test_the_check_finds_an_unexplained_and_a_stale_difference() -> None:
    config = """
model:
  class_path: loca_lightning.SegmentationFinetuneModule
  init_args:
    min_lr_ratio: 0.0
    poly_power: 0.9                  # differs from the default: it does not
    window: 256                      # differs from the default: smaller images
    optimizer:
      class_path: torch.optim.SGD
      init_args:
        lr: 0.001
        momentum: 0.8
"""
    assert unexplained(config) == [
        "min_lr_ratio: 0.0 (default 0.01) without '# differs from the default: <reason>'",
        "poly_power: marked '# differs from the default:' but equal to the default",
        "optimizer: {'class_path': 'torch.optim.SGD', 'init_args': {'lr': 0.001, 'momentum': 0.8}} (default "
        "{'class_path': 'torch.optim.SGD', 'init_args': {'lr': 0.001, 'momentum': 0.9, 'weight_decay': 0.0}}) "
        "without '# differs from the default: <reason>'",
    ]
