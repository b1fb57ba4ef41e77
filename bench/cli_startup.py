"""Start-up time of the serving commands: wall time of ``--help``, one fresh process per run.

Input:  none (the four commands: ``python -m stages.predict``, ``python -m stages.serve``,
        ``cxr-predict``, ``cxr-serve``; the console scripts only when installed in the venv).
Measures: median and max wall time of ``<command> --help`` over ``--repeats`` runs, and which
        of TensorFlow / torch / Gradio the command imported (none should: they load after the
        arguments are parsed). Target: median < 2 s (it was 8.4 s when ``--help`` imported them).
        tests/test_serve_startup.py checks the imports; timings live here, not in the tests.
Output: a table; JSON with ``--out``.
Run:    .venv/bin/python bench/cli_startup.py [--repeats 5] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from stages.common.utils import write_text_atomic  # noqa: E402

TARGET_S = 2.0
HEAVY = ("tensorflow", "torch", "gradio")
PROBE = (
    "import runpy, sys; sys.argv = [sys.argv[1], '--help']\n"
    "try:\n    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "except SystemExit:\n    pass\n"
    f"print('IMPORTED', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
)


def commands() -> dict[str, list[str]]:
    out = {
        "python -m stages.predict": [sys.executable, "-m", "stages.predict", "--help"],
        "python -m stages.serve": [sys.executable, "-m", "stages.serve", "--help"],
    }
    for script in ("cxr-predict", "cxr-serve"):
        path = Path(sys.executable).parent / script
        if path.is_file():
            out[script] = [str(path), "--help"]
    return out


def time_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=120, check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def imported(module: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, module], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = [x for x in done.stderr.splitlines() if x.startswith("IMPORTED")]
    return lines[-1].removeprefix("IMPORTED ") if lines else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    rows = []
    for name, argv in commands().items():
        times = [time_once(argv) for _ in range(args.repeats)]
        module = argv[2] if argv[1:2] == ["-m"] else ""
        rows.append(
            {
                "command": f"{name} --help",
                "median_s": round(statistics.median(times), 3),
                "max_s": round(max(times), 3),
                "target_s": TARGET_S,
                "ok": statistics.median(times) < TARGET_S,
                "heavy_imports": imported(module) if module else "(see the test)",
            }
        )
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':<{width}}  median_s  max_s  target  heavy imports")
    for r in rows:
        mark = "ok" if r["ok"] else "SLOW"
        print(
            f"{r['command']:<{width}}  {r['median_s']:8.3f}  {r['max_s']:5.2f}  "
            f"< {TARGET_S:.0f} s {mark:4}  {r['heavy_imports']}"
        )
    if args.out:
        doc = {"repeats": args.repeats, "results": rows}
        write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
