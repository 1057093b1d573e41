"""RUN_DIR/report.md and loss.png: what was trained, on what, how it went, and how to do it again."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def pyplot():
    """matplotlib's pyplot (headless), or a one-line error naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("training reports plot with matplotlib: pip install 'berrylm[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], png: Path) -> None:
    plt = pyplot()
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([t / 1e6 for t, _ in train], [x for _, x in train], label="train loss", lw=1)
    if val and train:
        by_step = {r["step"]: r["tokens"] for r in records if "tokens" in r}
        pts = [(by_step.get(r["step"]), r["val_loss"]) for r in val if by_step.get(r["step"]) is not None]
        ax.plot([t / 1e6 for t, _ in pts], [x for _, x in pts], "o-", label="val loss", ms=3)
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def _reproduce(command: str, world: int) -> str:
    """The command line; under DDP, the torchrun launch of the same berry command."""
    if world > 1 and command.startswith("berry "):
        return f"torchrun --standalone --nproc_per_node {world} berry.py " + command[len("berry "):]
    return command or "(run from Python)"


def write_report(trainer) -> Path:
    out = Path(trainer.cfg.out)
    records = read_log(trainer.log_path)
    plot_losses(records, out / "loss.png")
    cfg, mcfg = trainer.cfg, trainer.model.cfg
    speeds = [r["tok_per_s"] for r in records if "tok_per_s" in r][1:]  # the first window includes start-up
    ev = trainer.last_eval
    lines = [f"# {cfg.kind} run: {mcfg.name}", "",
             "Reproduce:", "", "```", _reproduce(cfg.command, trainer.world), "```", "",
             "## Result", "",
             f"- steps {trainer.step}/{trainer.total_steps}, tokens {trainer.tokens_seen:,}, "
             f"wall time {trainer.elapsed / 60:.1f} min",
             f"- val loss {ev.get('val_loss', float('nan')):.4f} nats/token"
             + (f", **val bpb {ev['val_bpb']:.4f}**" if ev.get("val_bpb") else ""),
             f"- throughput {sum(speeds) / len(speeds):,.0f} tokens/s (mean over logged windows)" if speeds else "",
             "", "![loss](loss.png)", "", "## Model", "", "```json", json.dumps(mcfg.to_dict(), indent=1), "```",
             f"{trainer.model.num_params() / 1e6:.3f}M parameters", "",
             "## Training configuration", "", "```json", json.dumps(asdict(cfg), indent=1), "```", ""]
    if trainer.data_stats:
        lines += ["## Data", "", "```json", json.dumps(trainer.data_stats, indent=1), "```", ""]
    if trainer.samples:
        lines += ["## Samples (greedy)", ""] + [f"- `{s!r}`" for s in trainer.samples] + [""]
    path = out / "report.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(ln for ln in lines if ln is not None))
    tmp.replace(path)
    return path
