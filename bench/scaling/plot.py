"""The study's figure: success vs wall-clock, speed-up, human effort, final success, learner usage."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

SOP_SPEEDUP = {1: 1.0, 2: 173.6 / 126.5, 4: 173.6 / 71.7}
"""SOP's time-to-80% speed-ups (grocery task, one run each)."""


def plot_study(result: dict, path: Path) -> None:
    """Write a 2x3 panel PNG of ``result`` (the study's JSON) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [str(n) for n in result["fleet_sizes"]]
    colors = {n: plt.cm.viridis(i / max(len(sizes) - 1, 1)) for i, n in enumerate(sizes)}
    threshold = result["success_threshold"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))

    ax = axes[0, 0]
    for n in sizes:
        c = result["success_curves"][n]
        t = np.asarray(c["t_s"]) / 60
        mean, std = np.asarray(c["mean"]), np.asarray(c["std"])
        ax.step(t, mean, where="post", color=colors[n], label=f"{n} robot{'s' if n != '1' else ''}")
        ax.fill_between(t, mean - std, mean + std, step="post", color=colors[n], alpha=0.15)
    ax.axhline(threshold, color="grey", ls="--", lw=1)
    ax.set(xlabel="wall-clock time (min)", ylabel="held-out success (operator off)", ylim=(-0.03, 1.03),
           title="success of the newest version (mean ± std over seeds)")
    ax.legend(loc="lower right")

    ax = axes[0, 1]
    ns = np.array(sorted({int(n) for n in sizes} | set(SOP_SPEEDUP)))
    ax.plot(ns, ns, ":", color="grey", label="linear")
    ax.plot(list(SOP_SPEEDUP), list(SOP_SPEEDUP.values()), "s--", color="tab:red", label="SOP (1 run each)")
    for n in sizes:
        value, b = result["speedup_to_0_8"][n], result["speedup_bounds"][n]
        for y, marker, text in ((value, "o", ""), (None if value is not None else b["lower"], "^", ">= "),
                                (None if value is not None else b["upper"], "v", "<= ")):
            if y is not None:
                ax.plot(int(n), y, marker, color="tab:blue", ms=8)
                ax.annotate(f"{text}{y:.2f}x", (int(n), y), textcoords="offset points", xytext=(6, -4), fontsize=8)
                break
    ax.plot([], [], "o", color="tab:blue", label="this study (▲ lower bound, ▼ upper bound)")
    ax.set(xlabel="robots", ylabel=f"speed-up to {threshold:.0%} success vs 1 robot", xticks=ns,
           title=f"time-to-{threshold:.0%} speed-up")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[0, 2]
    for n in sizes:
        e = result["human_effort"][n]
        y = [np.nan if v is None else v for v in e["intervention_steps_per_episode"]]
        ax.plot(np.asarray(e["t_s"]) / 60, y, "o-", color=colors[n], label=f"{n}")
    ax.set(xlabel="wall-clock time (min)", ylabel="intervention steps per episode",
           title="human effort per episode (mean over seeds)")
    ax.legend(title="robots")

    ax = axes[1, 0]
    tasks = list(result["final_success"][sizes[0]]["per_task"])
    width = 0.8 / len(sizes)
    for i, n in enumerate(sizes):
        vals = [result["final_success"][n]["per_task"][t] or 0.0 for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, color=colors[n], label=n)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, [t[:22] for t in tasks], rotation=30, ha="right",
                  fontsize=7)
    ax.set(ylabel="final held-out success", ylim=(0, 1.05), title="final success per task")
    ax.legend(title="robots", fontsize=8)

    ax = axes[1, 1]
    rohe = [result["rohe"][n]["mean"] or 0.0 for n in sizes]
    ax.bar(np.arange(len(sizes)), [r * 1000 for r in rohe], color=[colors[n] for n in sizes])
    ax.set_xticks(np.arange(len(sizes)), sizes)
    ax.set(xlabel="robots", ylabel="successes per 1000 intervention steps", title="Return on Human Effort")

    ax = axes[1, 2]
    learner = result["learner"]
    x = np.arange(len(sizes))
    for offset, key, label in ((-0.27, "trainer_cpu_cores", "learner"), (0.0, "robots_cpu_cores", "robots"),
                               (0.27, "other_load_cores", "other workloads")):
        ax.bar(x + offset, [learner[n][key] or 0 for n in sizes], 0.27, label=f"{label} (CPU cores)")
    ax2 = ax.twinx()
    ax2.plot(x, [learner[n]["samples_per_fresh_labeled_step"] or 0 for n in sizes], "ko-",
             label="samples per fresh label")
    ax2.set_ylabel("samples per fresh labelled step")
    ax.set_xticks(x, sizes)
    ax.set(xlabel="robots", ylabel="CPU cores", title="learner vs data")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)

    hw, cfg = result["hardware"], result["config"]
    longer = "".join(f" ({n} robot{'s' if n != 1 else ''}: {b:.0f} s)" for n, b in cfg.get("budget_by_size", ()))
    gpu = ", " + hw["gpu"] if hw["gpu"] else ", no GPU"
    fig.suptitle(f"Fleet scaling, {len(tasks)} MetaWorld task(s), HG-DAgger, budget {cfg['budget_s']:.0f} s/run"
                 f"{longer}, {len(cfg['seeds'])} seed(s) — {hw['cpu_cores']}-core CPU{gpu}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(compared: dict, path: Path) -> None:
    """Write ``--compare``'s figure: success curves (mean ± std over seeds) of each design and fleet size, and
    each run's final and last-minute success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    designs = compared["designs"]
    colors = [plt.cm.tab10(i % 10) for i in range(len(designs))]
    styles = ["-", "--", ":", "-."]
    fig, (curves, finals) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [2, 1]})
    for d, color in zip(designs, colors):
        for j, (n, row) in enumerate(d["fleet_sizes"].items()):
            c = row["curve"]
            t, mean, std = np.asarray(c["t_s"]) / 60, np.asarray(c["mean"]), np.asarray(c["std"])
            curves.step(t, mean, where="post", color=color, ls=styles[j % len(styles)],
                        label=f"{d['label']} — {n} robot{'s' if n != '1' else ''}")
            curves.fill_between(t, mean - std, mean + std, step="post", color=color, alpha=0.12)
    threshold = compared["success_threshold"]
    curves.axhline(threshold, color="grey", ls="--", lw=1)
    curves.axhline(0.95, color="tab:red", ls=":", lw=1)
    curves.set(xlabel="wall-clock time (min)", ylabel="held-out success (operator off)", ylim=(-0.03, 1.03),
               title="success of the newest version (mean ± std over seeds)")
    curves.legend(loc="lower right", fontsize=8)

    ticks, names = [], []
    for d, color in zip(designs, colors):
        for n, row in d["fleet_sizes"].items():
            x = len(ticks)
            for k, key, marker, label in ((-0.12, "final_success", "o", "last point"),
                                          (0.12, "final_minute_success", "s", "last minute (mean)")):
                finals.plot([x + k] * len(row[key]), row[key], marker, color=color, ms=7, alpha=0.8,
                            label=label if x == 0 else None)
            ticks.append(x)
            names.append(textwrap.fill(d["label"], 24) + f"\n{n} robot{'s' if n != '1' else ''}")
    finals.axhline(0.95, color="tab:red", ls=":", lw=1, label="target 0.95")
    finals.set_xticks(ticks, names, fontsize=7, rotation=30, ha="right")
    finals.set(ylabel="held-out success at the end", ylim=(min(0.5, finals.get_ylim()[0]), 1.02),
               title="each run's final success")
    finals.legend(loc="lower right", fontsize=8)
    fig.suptitle("Fleet scaling: designs compared", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
