"""The coordinate check's plot: one row per parameterization, one column per step, one line per curve against size
(as microsoft/mup's plot_coord_data)."""

from __future__ import annotations

import numpy as np

from maxscale.analysis import plotstyle


def plot(result: dict, path: str, verdict_: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = list(result["series"])
    steps = result["steps"] + 1
    sizes = result["sizes"]
    fig, axes = plt.subplots(len(labels), steps, figsize=(3.0 * steps, 2.7 * len(labels)), squeeze=False, sharex=True)
    for r, label in enumerate(labels):
        curves = result["series"][label]
        keys = [k for k in curves if k != "loss" and not k.endswith(("/mean", "/last"))]
        if result["axis"] == "depth":
            keys = ["embed", "attn/mean", "mlp/mean", "resid/mean", "resid/last", "logits"]
        for t in range(steps):
            ax = axes[r, t]
            for i, k in enumerate(keys):
                arr = np.asarray(curves[k], np.float64)[:, :, t].mean(1)
                ax.plot(sizes, arr, lw=1.1, label=k, **plotstyle.series(i))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(f"t={t}", fontsize=8)
            if t == 0:
                tag = ""
                if verdict_ is not None:
                    v = verdict_["series"][label]
                    tag = f"\n{'PASS' if v['pass'] else 'FAIL'} slope {v['max_slope']:.2f}"
                ax.set_ylabel(label + tag, fontsize=7)
            if r == len(labels) - 1:
                ax.set_xlabel(result["axis"], fontsize=7)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 8), fontsize=6, frameon=False)
    fig.suptitle(
        f"coordinate check: mean |x| vs {result['axis']} (lr={result['lr']:g}, {result['seeds']} seeds)", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)
