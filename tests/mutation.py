"""Mutation testing of the core modules with cosmic-ray, each module against its fast, targeted tests (`make mutate`).

    python tests/mutation.py REPORT.md [--per-module N] [--only PATH ...]

For each module, `cosmic-ray init` lists every mutant (cosmic-ray's core operators: binary, comparison and unary
operators swapped, numbers changed, and/or, True/False, break/continue, loops run zero times, ...). Sampling keeps
the run to about half an hour of CPU: one mutant drawn per mutated source position, then N positions drawn from
those (seeded, so a rerun draws the same mutants). `cosmic-ray exec` runs them in a scratch copy of berrylm/,
tests/ and pyproject.toml, so the working tree is never mutated. REPORT.md gets per-module counts and the diff of
every survivor; judging the survivors (a test to add, or why the mutant is equivalent) is written below them by hand.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = "python -m pytest -x -q -p no:cacheprovider"
# module -> (its fast tests, mutated positions to sample)
MODULES = {
    "berrylm/serve/block_manager.py": ("tests/test_engine.py -k 'prefix or preemption or n_shares'", 16),
    "berrylm/serve/kv_cache.py": ("tests/test_engine.py -k 'paged or batch_equals or chunked or chains'", 16),
    "berrylm/serve/scheduler.py": ("tests/test_engine.py -k 'preemption or batch_equals or n_shares or seeded'", 16),
    "berrylm/serve/detokenizer.py": ("tests/test_engine.py -k 'detokenizer'", 20),
    "berrylm/serve/sampler.py": ("tests/test_engine.py tests/test_isolation.py -k 'seeded or offline or penalties or "
                                 "json_mode or sibling or guided_redraw or vectorised or accepted_values'", 16),
    "berrylm/model/calculator.py": ("tests/test_calculator.py -k 'calculate or format or bounds'", 30),
    "berrylm/train/sft.py": ("tests/test_sft_data.py", 20),
    "berrylm/model/checkpoint.py": ("tests/test_checkpoint.py -k 'round_trip or half or crash or unknown or broken'",
                                    16),
}
TIMEOUT_S = 120  # per mutant; a mutant that hangs the tests counts as killed


def run(cmd: list[str], cwd: Path) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def sample(session: Path, n: int, seed: int) -> tuple[int, int, int]:
    """Mark all but the drawn mutants as skipped; -> (mutants, positions, drawn)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        items = sorted(db.work_items, key=lambda w: w.job_id)
        by_pos: dict[tuple, list] = {}
        for w in items:
            m = w.mutations[0]
            by_pos.setdefault((tuple(m.start_pos), tuple(m.end_pos)), []).append(w)
        rng = random.Random(seed)
        keep = [rng.choice(ws) for _, ws in sorted(by_pos.items())]
        keep = {w.job_id for w in rng.sample(keep, min(n, len(keep)))}
        db.set_multiple_results([w.job_id for w in items if w.job_id not in keep],
                                WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    return len(items), len(by_pos), len(keep)


def mutate(module: str, tests: str, n: int, work: Path, seed: int) -> dict:
    name = Path(module).stem
    config, session = work / f"{name}.toml", work / f"{name}.sqlite"
    config.write_text(f'[cosmic-ray]\nmodule-path = "{module}"\ntimeout = {TIMEOUT_S}\nexcluded-modules = []\n'
                      f'test-command = "{sys.executable} -m {PYTEST.removeprefix("python -m ")} {tests}"\n'
                      f'[cosmic-ray.distributor]\nname = "local"\n')
    cr = str(Path(sys.executable).with_name("cosmic-ray"))
    run([cr, "init", str(config), str(session)], work)
    total, positions, drawn = sample(session, n, seed)
    t = time.monotonic()
    run([cr, "exec", str(config), str(session)], work)
    dump = [json.loads(line) for line in run([cr, "dump", str(session)], work).splitlines()]
    done = [(item, res) for item, res in dump if res and res["worker_outcome"] != "skipped"]
    survivors = [(item, res) for item, res in done if res["test_outcome"] == "survived"]
    incompetent = [r for _, r in done if r["test_outcome"] == "incompetent"]
    return {"module": module, "tests": tests, "total": total, "positions": positions, "drawn": drawn,
            "killed": len(done) - len(survivors) - len(incompetent), "incompetent": len(incompetent),
            "survivors": survivors, "seconds": time.monotonic() - t}


def report(results: list[dict], path: Path, seed: int) -> None:
    lines = ["# Mutation testing (cosmic-ray)", "",
             f"`make mutate` (tests/mutation.py, seed {seed}): per module, one mutant drawn per mutated source "
             "position, then up to N positions; each run against the module's targeted tests only.", "",
             "| module | mutants | positions | run | killed | survived | incompetent | tests | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['module']}` | {r['total']} | {r['positions']} | {r['drawn']} | {r['killed']} | "
                     f"{len(r['survivors'])} | {r['incompetent']} | `{r['tests']}` | {r['seconds']:.0f} |")
    lines += ["", "## Survivors", ""]
    for r in results:
        for item, res in r["survivors"]:
            m = item["mutations"][0]
            lines += [f"### `{r['module']}`:{m['start_pos'][0]} {m['operator_name']} #{m['occurrence']}", "",
                      "```diff", (res.get("diff") or "").strip(), "```", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--per-module", type=int, default=None, help="positions to sample per module (default: table)")
    ap.add_argument("--only", nargs="*", default=None, help="module paths to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="berry-mutate-") as tmp:
        work = Path(tmp)
        for part in ("berrylm", "tests", "pyproject.toml"):
            src = ROOT / part
            (shutil.copytree(src, work / part, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
             else shutil.copy(src, work / part))
        for module, (tests, n) in MODULES.items():
            if args.only is None or module in args.only:
                run([sys.executable, *PYTEST.split()[1:], *shlex.split(tests)], work)  # baseline passes
                results.append(mutate(module, tests, args.per_module or n, work, args.seed))
                r = results[-1]
                print(f"{module}: {r['drawn']} of {r['total']} mutants, {r['killed']} killed, "
                      f"{len(r['survivors'])} survived ({r['seconds']:.0f} s)", flush=True)
    report(results, args.report, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
