"""PIT benchmark: qcelery's vectorised P against Qlib's own P operator on the same files.

    .venv/bin/python bench/pit.py                      # 300 instruments x 15 years, Qlib on 20 of them
    .venv/bin/python bench/pit.py --qlib-instruments 0 # Qlib on all instruments (about 25 min)

Statements: ``synthetic_statements`` (quarterly ``roewa_q``, published 20-90 days
after the quarter, 20% of quarters revised once or twice, up to ~600 days later),
written with ``PITStore`` into a Qlib provider folder (``calendars/day.txt`` = XSHG
sessions, ``financial/...``). Observation days: every session from the first
statement year to one year after the last.

Timed (best of ``--repeat``; each qcelery run starts with a fresh store, so it reads
and checks the files like Qlib does):
* ``P($$roewa_q)`` and ``P(Mean($$roewa_q, 4))`` for every instrument and day;
* the same two columns with Qlib 0.9.7 (``D.features``, ``kernels=1``, expression and
  dataset caches off) for ``--qlib-instruments`` of them, run by the interpreter that
  has ``pyqlib`` (this one, ``$QLIB_PYTHON`` or ``.venv-qlib/bin/python``) as a
  subprocess over the same files; both sides' values are compared.
Also checks that Qlib's ``scripts/dump_pit.py`` (``--dump-pit``) writes byte-identical
files from the same statements.

The anchor ratio is Qlib's time over qcelery's on the same instruments and days.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIELD = "roewa_q"
EXPRESSIONS = {"P": "P($$roewa_q)", "P_mean4": "P(Mean($$roewa_q, 4))"}


# --------------------------------------------------------------------------- Qlib side
def qlib_side(provider: str, instruments_file: str, start: str, end: str, out: str) -> None:
    """Runs under the interpreter that has pyqlib; imports nothing from qcelery."""
    import logging

    import numpy as np
    import qlib
    from qlib.data import D

    qlib.init(
        provider_uri=provider,
        region="cn",
        kernels=1,
        expression_cache=None,
        dataset_cache=None,
        logging_level=logging.WARNING,
    )
    instruments = Path(instruments_file).read_text().split()
    D.features(instruments[:1], [EXPRESSIONS["P"]], start_time=start, end_time=start, freq="day")  # warm-up
    result: dict[str, object] = {"version": qlib.__version__, "seconds": {}}
    arrays = {}
    for key, expr in EXPRESSIONS.items():
        t0 = time.perf_counter()
        frame = D.features(instruments, [expr], start_time=start, end_time=end, freq="day")
        result["seconds"][key] = time.perf_counter() - t0
        frame = frame.reset_index()
        arrays[key + "_inst"] = frame["instrument"].astype(str).str.lower().to_numpy().astype("U")
        dt = frame["datetime"].dt
        arrays[key + "_date"] = (dt.year * 10000 + dt.month * 100 + dt.day).to_numpy(dtype=np.int64)
        arrays[key + "_value"] = frame[expr].to_numpy(dtype=np.float64)
    np.savez(out, **arrays)
    Path(out + ".json").write_text(json.dumps(result))


def find_qlib_python() -> str | None:
    try:
        import qlib  # noqa: F401 - only whether it imports

        return sys.executable
    except ImportError:
        pass
    for candidate in (os.environ.get("QLIB_PYTHON"), str(REPO / ".venv-qlib" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import qlib"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


# --------------------------------------------------------------------------- qcelery side
def main() -> None:
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from qcelery.calendar import TradingCalendar
    from qcelery.pit import PITStore, pit_panel, synthetic_statements

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instruments", type=int, default=300)
    ap.add_argument("--years", type=int, default=15)
    ap.add_argument("--start-year", type=int, default=2005)
    ap.add_argument("--qlib-instruments", type=int, default=20, help="instruments Qlib evaluates (0 = all)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump-pit", default="/tmp/qlib_ref/scripts/dump_pit.py", help="Qlib's dump_pit.py script")
    ap.add_argument("--keep", action="store_true", help="keep the provider folder")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qcelery-pit-bench-"))
    provider = work / "provider"
    try:
        instruments = [f"SH{600000 + i:06d}" for i in range(args.instruments)]
        end_year = args.start_year + args.years - 1
        calendar = TradingCalendar.from_exchange("XSHG", start=f"{args.start_year}-01-01", end=f"{end_year + 1}-12-31")
        days = calendar.dates
        (provider / "calendars").mkdir(parents=True)
        (provider / "calendars" / "day.txt").write_text("\n".join(d.strftime("%Y-%m-%d") for d in days) + "\n")
        (provider / "instruments").mkdir()
        (provider / "instruments" / "all.txt").write_text("".join(f"{i}\t{days[0]:%Y-%m-%d}\t{days[-1]:%Y-%m-%d}\n" for i in instruments))
        statements = synthetic_statements(instruments, args.start_year, end_year, FIELD, args.seed)
        n_records = sum(len(s) for s in statements.values())
        n_revisions = sum(int(s["period"].duplicated().sum()) for s in statements.values())

        t0 = time.perf_counter()
        store = PITStore(provider)
        for instrument, frame in statements.items():
            store.write(instrument, FIELD, frame)
        write_s = time.perf_counter() - t0

        def timed(instr: list[str], spec: dict[str, str]) -> tuple[float, pd.DataFrame]:
            best, panel = float("inf"), None
            for _ in range(args.repeat):
                t = time.perf_counter()
                panel = pit_panel(PITStore(provider), instr, days, spec)  # fresh store: reads the files
                best = min(best, time.perf_counter() - t)
            return best, panel

        ours = {key: timed(instruments, {key: expr}) for key, expr in EXPRESSIONS.items()}
        n_q = len(instruments) if args.qlib_instruments <= 0 else min(args.qlib_instruments, len(instruments))
        subset = instruments[:n_q]
        ours_subset = {key: timed(subset, {key: expr}) for key, expr in EXPRESSIONS.items()}

        print(
            f"# PIT benchmark: {len(instruments)} instruments x {args.years} years of quarterly statements "
            f"({n_records} records, {n_revisions} revisions), {len(days)} XSHG trading days "
            f"{days[0]:%Y-%m-%d}..{days[-1]:%Y-%m-%d}"
        )
        print(
            f"# python {sys.version.split()[0]}, numpy {np.__version__}, pandas {pd.__version__}, "
            f"{os.cpu_count()} cpu(s); best of {args.repeat}"
        )
        print(f"# qcelery write (all files): {write_s:.3f} s")
        print()
        print("| expression | instruments | qcelery s | Qlib s | Qlib / qcelery | values equal |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for key, expr in EXPRESSIONS.items():
            print(f"| `{expr}` | {len(instruments)} | {ours[key][0]:.4f} | | | |")

        qlib_python = find_qlib_python()
        if qlib_python is None:
            print()
            print("Qlib anchor absent: no `import qlib` here, no $QLIB_PYTHON, no .venv-qlib/bin/python")
            return
        (work / "subset.txt").write_text("\n".join(subset))
        out = str(work / "qlib_out")
        cmd = [
            qlib_python,
            str(Path(__file__).resolve()),
            "--qlib-side",
            str(provider),
            str(work / "subset.txt"),
            f"{days[0]:%Y-%m-%d}",
            f"{days[-1]:%Y-%m-%d}",
            out,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            raise SystemExit(f"Qlib side failed (exit {proc.returncode}): {' '.join(cmd)}")
        qres = json.loads(Path(out + ".json").read_text())
        qarr = np.load(out + ".npz", allow_pickle=False)
        for key, expr in EXPRESSIONS.items():
            panel = ours_subset[key][1][key]
            q = pd.Series(
                qarr[key + "_value"],
                index=pd.MultiIndex.from_arrays([pd.to_datetime(qarr[key + "_date"].astype(str), format="%Y%m%d"), qarr[key + "_inst"]]),
            )
            mine = panel.copy()
            mine.index = pd.MultiIndex.from_arrays([mine.index.get_level_values(0), mine.index.get_level_values(1).str.lower()])
            q = q.reindex(mine.index)
            same_nan = np.isnan(mine.values) == np.isnan(q.values)
            close = np.isclose(mine.values, q.values, rtol=1e-6, atol=1e-9, equal_nan=True)
            bad = int((~(same_nan & close)).sum())
            qs, cs = qres["seconds"][key], ours_subset[key][0]
            verdict = "yes" if bad == 0 else f"NO: {bad} of {len(mine)} differ"
            print(f"| `{expr}` | {n_q} | {cs:.4f} | {qs:.2f} | **{qs / cs:,.0f}x** | {verdict} (float32 tol.) |")
        print()
        print(f"Anchor: Qlib {qres['version']} `D.features` (`kernels=1`, caches off) via {qlib_python}.")
        for key, expr in EXPRESSIONS.items():
            q_us = 1e6 * qres["seconds"][key] / (n_q * len(days))
            c_us = 1e6 * ours[key][0] / (len(instruments) * len(days))
            print(
                f"Per instrument-day, `{expr}`: Qlib {q_us:.1f} us ({n_q} instruments), qcelery {c_us:.3f} us "
                f"({len(instruments)} instruments): **{q_us / c_us:,.0f}x**"
            )
        dump_check(args, qlib_python, statements, work)
    finally:
        if args.keep:
            print(f"provider kept at {provider}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def dump_check(args, qlib_python: str, statements: dict, work: Path) -> None:
    """Qlib's dump_pit and PITStore.write produce the same bytes from the same statements."""
    import numpy as np

    from qcelery.pit import PITStore

    script = Path(args.dump_pit)
    if not script.exists():
        print(f"dump_pit byte check skipped: {script} not found (--dump-pit)")
        return
    sample = dict(list(statements.items())[:20])
    csv_dir, qlib_dir, ours_dir = work / "csv", work / "dumped", work / "ours"
    csv_dir.mkdir()
    store = PITStore(ours_dir)
    for instrument, frame in sample.items():
        frame = frame.assign(value=frame["value"].astype(np.float32).astype(np.float64))  # dump_pit rounds to float32
        store.write(instrument, FIELD, frame)
        frame.assign(date=frame["date"].dt.strftime("%Y-%m-%d"), field=FIELD[:-2]).to_csv(
            csv_dir / f"{instrument.lower()}.csv", index=False
        )
    proc = subprocess.run(
        [
            qlib_python,
            str(script),
            "dump",
            "--csv_path",
            str(csv_dir),
            "--qlib_dir",
            str(qlib_dir),
            "--interval",
            "quarterly",
            "--max_workers",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=script.parent,
    )
    if proc.returncode != 0:
        print(f"dump_pit byte check failed to run: {proc.stderr[-2000:]}")
        return
    same = 0
    for instrument in sample:
        pair = [(d / "financial" / instrument.lower() / f"{FIELD}{suffix}") for d in (qlib_dir, ours_dir) for suffix in (".data", ".index")]
        same += pair[0].read_bytes() == pair[2].read_bytes() and pair[1].read_bytes() == pair[3].read_bytes()
    print(
        f"dump_pit byte check: {same} of {len(sample)} instruments byte-identical (.data and .index) "
        f"between Qlib's {script.name} and PITStore.write"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--qlib-side":
        qlib_side(*sys.argv[2:7])
    else:
        main()
