"""The state every command shares: the settings (built once) and the consoles.

Settings come from the usual places (keyword overrides, ``QCELERY_*`` variables, the
TOML file named by ``QCELERY_CONFIG`` or ``./qcelery.toml``). On top of that, when
``QCELERY_CONFIG`` is not set and ``qcelery up`` left a ``qcelery.toml`` in the run
directory, that file is the one read: after ``qcelery up`` every other command finds
the servers it started, while explicit ``QCELERY_*`` variables still win.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from ..errors import ConfigError
from ..settings import Settings, load_settings
from .rundir import CONFIG_FILE

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, a package before 3.11 (and what pydantic-settings reads TOML with there)
    import tomli as tomllib


def _pipe_width(stream) -> int | None:
    """Piped output is not cut to 80 columns (rich's default off a terminal)."""
    if stream.isatty() or os.environ.get("COLUMNS"):
        return None
    return 200


#: tables and results; errors and progress go to stderr so stdout stays parseable
out = Console(highlight=False, soft_wrap=True, width=_pipe_width(sys.stdout))
err = Console(stderr=True, highlight=False, width=_pipe_width(sys.stderr))


@dataclass
class CliState:
    """Options of the ``qcelery`` callback; ``settings`` is built on first use, once."""

    run_dir: Path | None = None
    verbose: bool = False
    _settings: Settings | None = field(default=None, repr=False)

    def _load(self) -> Settings:
        overrides = {"run_dir": self.run_dir} if self.run_dir else {}
        try:
            return load_settings(**overrides)
        except tomllib.TOMLDecodeError as exc:
            path = os.environ.get("QCELERY_CONFIG") or "qcelery.toml"
            raise ConfigError(f"malformed TOML in {path}: {exc}") from None

    def settings(self, use_run_config: bool = True) -> Settings:
        """The settings of this invocation. ``use_run_config=False`` (``up``) ignores the
        run directory's ``qcelery.toml``, which describes servers of an earlier ``up``."""
        if self._settings is not None:
            return self._settings
        settings = self._load()
        if use_run_config and not os.environ.get("QCELERY_CONFIG"):
            live = Path(settings.run_dir) / CONFIG_FILE
            if live.is_file():
                # CLI process only: library code never reads the environment itself
                os.environ["QCELERY_CONFIG"] = str(live)
                settings = self._load()
        self._settings = settings
        return settings
