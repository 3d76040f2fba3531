"""Model registry in the style of timm: `@register_model` and `create_model(name, **kw)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; registered models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
