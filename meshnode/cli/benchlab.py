"""Finding the bench lab: ``meshnode bench`` runs from a source checkout (``bench/lab`` is not in the wheel)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from meshnode.errors import ConfigError

__all__ = ["lab_module"]

CHECKOUT = Path(__file__).resolve().parents[2]


def lab_module(name: str) -> ModuleType:
    """``bench.lab.<name>`` from the checkout this meshnode was installed from.

    Raises:
        ConfigError: this meshnode is not an (editable) install of a source checkout.
    """
    if not (CHECKOUT / "bench" / "lab" / "__init__.py").is_file():
        raise ConfigError("meshnode bench needs the source checkout (bench/lab is not part of the installed "
                          "package): clone the repository and run scripts/setup.sh there")
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module(f"bench.lab.{name}")
