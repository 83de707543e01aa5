"""``qcelery qlib-data DIR``: the synthetic market as a Qlib provider directory, so Qlib's
own examples (``qlib_init: {provider_uri: DIR}``, ``Alpha158``) run without a download.
No server is needed."""

from __future__ import annotations

from pathlib import Path

import typer

from .state import out

app = typer.Typer()


@app.command("qlib-data", rich_help_panel="Data")
def qlib_data(
    target: Path = typer.Argument(..., help="Directory to write (must be empty or not exist, unless --overwrite)."),
    instruments: int = typer.Option(60, "--instruments", "-n", min=2, help="Number of synthetic stocks (SYN0000, ...)."),
    start: str = typer.Option("2020-01-02", "--start", help="First day of the data (80 warm-up trading days come before it)."),
    end: str = typer.Option("2024-12-31", "--end", help="Last day of the data."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulation (same seed, same market)."),
    signal_strength: float = typer.Option(0.05, "--signal-strength", help="Strength of the planted signal (0: nothing to find)."),
    calendar: str = typer.Option("XSHG", "--calendar", help="Exchange whose trading days the market follows."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier provider in DIR."),
) -> None:
    """Write the synthetic market (prices, volume, vwap, factor) in Qlib's binary layout
    (calendars/, instruments/, features/) and print the qlib_init that reads it."""
    from ..data.qlib_provider import write_qlib_provider

    root = write_qlib_provider(
        target,
        instruments=instruments,
        start_time=start,
        end_time=end,
        seed=seed,
        signal_strength=signal_strength,
        calendar=calendar,
        overwrite=overwrite,
    )
    out.print(f"Qlib provider written to {root.resolve()}", markup=False)
    out.print(f"qlib_init:\n    provider_uri: {root.resolve()}\n    region: cn", markup=False)
