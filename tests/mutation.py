"""Mutation testing of the core modules with cosmic-ray, each module against its fast, targeted tests (`make mutate`).

    python tests/mutation.py REPORT.md [--per-module N] [--only PATH ...] [--work DIR]
    python tests/mutation.py REPORT.md --rerun-survivors --work DIR

For each module, `cosmic-ray init` lists every mutant (cosmic-ray's core operators: binary, comparison and unary
operators swapped, numbers changed, and/or, True/False, break/continue, loops run zero times, ...). Sampling keeps
the run to about half an hour of CPU: one mutant drawn per mutated source position, then N positions drawn from
those (seeded, so a rerun draws the same mutants). `cosmic-ray exec` runs them in a scratch copy of berrylm/,
tests/ and pyproject.toml (DIR, a temporary directory unless given), so the working tree is never mutated.
REPORT.md gets per-module counts and the diff of every survivor, rewritten after each module; judging the survivors
(a test to add, or why the mutant is equivalent) is written below them by hand.

--rerun-survivors takes the sessions a first run left in DIR, copies the current tests/ (and berrylm/) in, and runs
only that run's survivors again: the report then says which of them the tests added since kill.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = "python -m pytest -x -q -p no:cacheprovider"
ENGINE = "tests/test_engine.py"
# module -> (its fast tests, mutated positions to sample)
MODULES = {
    "berrylm/serve/block_manager.py": (f"{ENGINE} -k 'prefix or preempt or n_shares or side_by_side'", 16),
    "berrylm/serve/kv_cache.py": (f"{ENGINE} tests/test_quantize.py -k 'paged or batch_equals or chunked or chains "
                                  "or hybrid_prefill or plan_kv'", 16),
    "berrylm/serve/scheduler.py": (f"{ENGINE} -k 'preempt or batch_equals or n_shares or seeded or admission'", 16),
    "berrylm/serve/detokenizer.py": (f"{ENGINE} -k 'detokenizer'", 20),
    "berrylm/serve/sampler.py": (f"{ENGINE} tests/test_isolation.py -k 'seeded or offline or penalties or "
                                 "json_mode or sibling or guided_redraw or vectorised or accepted_values or "
                                 "top_logprobs'", 16),
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


def cosmic_ray(*args: str, cwd: Path) -> str:
    return run([str(Path(sys.executable).with_name("cosmic-ray")), *args], cwd)


def copy_tree(work: Path) -> None:
    """The current berrylm/, tests/ and pyproject.toml into work (replacing what is there)."""
    for part in ("berrylm", "tests", "pyproject.toml"):
        src, dst = ROOT / part, work / part
        if dst.is_dir():
            shutil.rmtree(dst)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, dst))


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


def outcomes(session: Path, work: Path) -> tuple[list, list, int]:
    """-> (the mutants run, the survivors among them, how many were incompetent), as (work item, result) pairs."""
    dump = [json.loads(line) for line in cosmic_ray("dump", str(session), cwd=work).splitlines()]
    done = [(item, res) for item, res in dump if res and res["worker_outcome"] != "skipped"]
    survivors = [(item, res) for item, res in done if res["test_outcome"] == "survived"]
    return done, survivors, sum(1 for _, res in done if res["test_outcome"] == "incompetent")


def configure(module: str, tests: str, work: Path) -> tuple[Path, Path]:
    """Write the module's cosmic-ray config (its tests as the test command); -> (config, session) paths."""
    name = Path(module).stem
    config, session = work / f"{name}.toml", work / f"{name}.sqlite"
    config.write_text(f'[cosmic-ray]\nmodule-path = "{module}"\ntimeout = {TIMEOUT_S}\nexcluded-modules = []\n'
                      f'test-command = "{sys.executable} -m {PYTEST.removeprefix("python -m ")} {tests}"\n'
                      f'[cosmic-ray.distributor]\nname = "local"\n')
    return config, session


def mutate(module: str, tests: str, n: int, work: Path, seed: int) -> dict:
    config, session = configure(module, tests, work)
    cosmic_ray("init", str(config), str(session), cwd=work)
    total, positions, drawn = sample(session, n, seed)
    t = time.monotonic()
    cosmic_ray("exec", str(config), str(session), cwd=work)
    done, survivors, incompetent = outcomes(session, work)
    return {"module": module, "tests": tests, "total": total, "positions": positions, "drawn": drawn,
            "killed": len(done) - len(survivors) - incompetent, "incompetent": incompetent,
            "survivors": survivors, "killed_later": [], "seconds": time.monotonic() - t}


def rerun_survivors(r: dict, work: Path) -> None:
    """Run r's survivors again against the module's tests as they are now; move the ones that die to
    r['killed_later']."""
    r["tests"] = MODULES[r["module"]][0]
    config, session = configure(r["module"], r["tests"], work)
    ids = [item["job_id"] for item, _ in r["survivors"]]
    with sqlite3.connect(session) as db:
        db.executemany("DELETE FROM work_results WHERE job_id = ?", [(i,) for i in ids])
    t = time.monotonic()
    cosmic_ray("exec", str(config), str(session), cwd=work)
    _, still, _ = outcomes(session, work)
    still_ids = {item["job_id"] for item, _ in still}
    r["killed_later"] += [(item, res) for item, res in r["survivors"] if item["job_id"] not in still_ids]
    r["survivors"] = [(item, res) for item, res in r["survivors"] if item["job_id"] in still_ids]
    r["rerun_seconds"] = time.monotonic() - t


def _mutant(r: dict, item: dict, res: dict) -> list[str]:
    m = item["mutations"][0]
    return [f"### `{r['module']}`:{m['start_pos'][0]} {m['operator_name']} #{m['occurrence']}", "",
            "```diff", (res.get("diff") or "").strip(), "```", ""]


def report(results: list[dict], path: Path, seed: int) -> None:
    lines = ["# Mutation testing (cosmic-ray)", "",
             f"`make mutate` (tests/mutation.py, seed {seed}): per module, one mutant drawn per mutated source "
             "position, then up to N positions; each run against the module's targeted tests only. "
             "'killed later': survivors of the first run that the tests added after it kill "
             "(`tests/mutation.py --rerun-survivors`).", "",
             "| module | mutants | positions | run | killed | survived | killed later | still surviving | "
             "incompetent | tests | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        first = len(r["survivors"]) + len(r["killed_later"])
        lines.append(f"| `{r['module']}` | {r['total']} | {r['positions']} | {r['drawn']} | {r['killed']} | "
                     f"{first} | {len(r['killed_later'])} | {len(r['survivors'])} | {r['incompetent']} | "
                     f"`{r['tests']}` | {r['seconds']:.0f} |")
    lines += ["", "## Survivors killed by tests added after the first run", ""]
    lines += [x for r in results for item, res in r["killed_later"] for x in _mutant(r, item, res)]
    lines += ["## Survivors", ""]
    lines += [x for r in results for item, res in r["survivors"] for x in _mutant(r, item, res)]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--per-module", type=int, default=None, help="positions to sample per module (default: table)")
    ap.add_argument("--only", nargs="*", default=None, help="module paths to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory to keep (default: a temporary one)")
    ap.add_argument("--rerun-survivors", action="store_true", help="rerun the survivors of the run left in --work")
    args = ap.parse_args()
    if args.rerun_survivors and args.work is None:
        ap.error("--rerun-survivors needs --work")
    with tempfile.TemporaryDirectory(prefix="berry-mutate-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        saved = work / "results.json"
        copy_tree(work)
        results = json.loads(saved.read_text()) if args.rerun_survivors else []
        todo = results if args.rerun_survivors else [m for m in MODULES if args.only is None or m in args.only]
        for entry in todo:
            module = entry["module"] if args.rerun_survivors else entry
            tests = MODULES[module][0]
            run([sys.executable, *PYTEST.split()[1:], *shlex.split(tests)], work)  # baseline passes
            if args.rerun_survivors:
                rerun_survivors(entry, work)
                r = entry
            else:
                results.append(r := mutate(module, tests, args.per_module or MODULES[module][1], work, args.seed))
            print(f"{module}: {r['drawn']} of {r['total']} mutants, {r['killed']} killed, "
                  f"{len(r['killed_later'])} killed later, {len(r['survivors'])} surviving", flush=True)
            saved.write_text(json.dumps(results))
            report(results, args.report, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
