"""Random-number-generator state: saved per rank by the engine format (an exact resume at
the same layout), or re-derived from (seed, step, rank) where the layout changed
(canonical resume: other ranks anyway)."""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int, step: int, rank: int) -> int:
    """Seeds python, numpy and torch from (seed, step, rank); returns the derived seed."""
    derived = zlib.crc32(f"moe_train/{seed}/{step}/{rank}".encode())
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived
