"""`berry data` (train/data/cli.py), `berry train` and `berry eval` (train/train_cli.py)."""

from __future__ import annotations

import argparse

from berrylm.train import train_cli
from berrylm.train.data import cli as data_cli


def register(sub: argparse._SubParsersAction) -> None:
    data_cli.register(sub)
    train_cli.register(sub)
