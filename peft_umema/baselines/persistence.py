"""Saving fitted baseline states as safetensors, so that nothing is ever unpickled on load."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class SafetensorsState(ABC):
    """`save`/`load` for objects whose fitted state is a flat dict of tensors (`state_dict`/`load_state_dict`).

    The file records the class name, so that loading, say, a SWAG file into a Laplace object fails loudly instead of
    failing later on a missing key.
    """

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, path: str | os.PathLike) -> None:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, os.fspath(path), metadata={"method": type(self).__name__})

    def load(self, path: str | os.PathLike) -> None:
        with safe_open(os.fspath(path), framework="pt") as handle:
            method = (handle.metadata() or {}).get("method")
        if method != type(self).__name__:
            raise ValueError(f"{path} holds a {method or 'unknown'} state, not a {type(self).__name__} state")
        self.load_state_dict(load_file(os.fspath(path)))


def check_state_keys(state: dict[str, torch.Tensor], expected: set[str], owner: str) -> None:
    """Raise a readable error naming the keys a state lacks or has in excess."""
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{owner} state does not match: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def check_state_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], owner: str) -> None:
    """Raise a readable error naming the tensors whose shapes differ from what this object expects."""
    wrong = [
        f"{name}: {tuple(state[name].shape)} != {tuple(shape)}"
        for name, shape in expected.items()
        if state[name].shape != shape
    ]
    if wrong:
        raise ValueError(f"{owner} state has tensors of the wrong shape: {wrong[:5]}")
