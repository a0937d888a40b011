"""Singular-value spectra of the hidden weight matrices: bulk edge, outliers, change from init, stable rank.

    python -m maxscale.analysis.spectra RUN_OR_SWEEP_DIR [--steps=0,50,100] [--top_k=8] [--edge=mp|fit|init]
                                        [--tol=0.05] [--layer=N] [--out=DIR]
writes spectra.json, spectra.md and spectra.png (top-k singular values over training, one colour per width).

Every matrix parameter of the blocks whose role is in `roles` (default: hidden, expert_in, expert_out) is cut into
2-D matrices, one per layer (and per expert): the `layers` (and `experts`) axes index matrices, the fan-in axes of
its ParamSpec are flattened into the rows and the rest into the columns (wq [L, D, H, K] -> L of [D, H*K]; wo
[L, H, K, D] -> L of [H*K, D]). For each matrix W_t (and its initial value W_0):
  singular values  s_1 >= s_2 >= ... (float64 SVD)
  bulk edge        an n x m matrix of i.i.d. entries of std s has its singular values in s|sqrt n - sqrt m| ..
                   s (sqrt n + sqrt m) (Marchenko-Pastur). edge="mp": s = RMS of the entries of W_0; edge="fit":
                   s fitted to W_t itself by matching its median singular value to the MP median (robust to a few
                   outliers); edge="init": the top singular value of W_0 (the finite-size edge of the init)
  outliers         singular values above edge x (1 + tol)
  stable rank      ||W||_F^2 / ||W||_2^2
  change from init ||W_t - W_0||_2 and ||W_t - W_0||_F, also relative to ||W_0||_2 and ||W_0||_F, and the top
                   singular values of W_t - W_0
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Iterator

import numpy as np

from maxscale.analysis import plotstyle
from maxscale.analysis import runs as runs_lib
from maxscale.errors import ConfigError
from maxscale.model import transformer

HIDDEN_ROLES = ("hidden", "expert_in", "expert_out")
EDGES = ("mp", "fit", "init")


# ----------------------------------------------------------------------------------------------------------------
# One matrix


def singular_values(w: Any) -> np.ndarray:
    """Singular values of a 2-D array, descending (float64)."""
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


def stable_rank(sv: np.ndarray) -> float:
    """||W||_F^2 / ||W||_2^2 from the singular values (0 for a zero matrix)."""
    sv = np.asarray(sv, np.float64)
    return float(np.sum(sv**2) / sv[0] ** 2) if len(sv) and sv[0] > 0 else 0.0


def entry_std(w: Any) -> float:
    """RMS of the entries: the std of an i.i.d. zero-mean init."""
    return float(np.sqrt(np.mean(np.square(np.asarray(w, np.float64)))))


def mp_edge(std: float, n: int, m: int) -> float:
    """Largest singular value of an n x m matrix of i.i.d. entries of std `std`, as n, m grow: s (sqrt n + sqrt m)."""
    return std * (math.sqrt(n) + math.sqrt(m))


def mp_median(n: int, m: int) -> float:
    """Median singular value of an n x m matrix of i.i.d. unit-variance entries under the Marchenko-Pastur law."""
    small, big = min(n, m), max(n, m)
    y = small / big
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    theta = np.linspace(0.0, math.pi, 20001)  # x = a + (b - a)(1 - cos theta)/2 smooths the square-root ends
    x = a + (b - a) * (1 - np.cos(theta)) / 2
    dx = (b - a) * np.sin(theta) / 2
    root = (b - a) * np.sin(theta) / 2  # sqrt((b - x)(x - a))
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(x > 0, root / (2 * math.pi * y * x), 0.0) * dx
    if y == 1.0:  # a = 0: the integrand tends to a finite limit at theta = 0
        density[0] = density[1]
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(theta))])
    x_med = float(np.interp(0.5, cdf / cdf[-1], x))
    return math.sqrt(big * x_med)


def fit_std(sv: np.ndarray, n: int, m: int) -> float:
    """The entry std of the i.i.d. bulk whose MP median matches the median of `sv` (a few outliers barely move it)."""
    return float(np.median(sv)) / mp_median(n, m)


def init_reference(w0: Any) -> dict:
    """What `spectrum` needs of W_0, computed once per matrix: the array, its singular values, its entry std."""
    w0 = np.asarray(w0, np.float64)
    return {"w": w0, "sv": singular_values(w0), "std": entry_std(w0)}


def spectrum(w: Any, w0: Any = None, edge: str = "mp", tol: float = 0.05, top_k: int = 8) -> dict:
    """The spectral summary of one 2-D matrix `w`, against its initial value `w0` when given (an array, or its
    `init_reference`; edges "mp" and "init" need it, without it the edge is fitted). Keys: shape, sv, top (the
    top_k singular values), spectral_norm, frobenius, stable_rank, std, edge, edge_method, n_outliers, outliers;
    with `w0` also init_spectral_norm, init_frobenius, delta_spectral, delta_frobenius, rel_delta_spectral,
    rel_delta_frobenius, delta_top, delta_stable_rank."""
    if edge not in EDGES:
        raise ConfigError(f"edge={edge!r} is not supported; choose one of {', '.join(EDGES)}")
    w = np.asarray(w, np.float64)
    n, m = w.shape
    sv = singular_values(w)
    out: dict = {"shape": [n, m], "sv": sv, "top": sv[:top_k].tolist(), "spectral_norm": float(sv[0])}
    out["frobenius"] = float(np.sqrt(np.sum(sv**2)))
    out["stable_rank"] = stable_rank(sv)
    if w0 is None and edge != "fit":
        edge = "fit"
    if edge == "fit":
        std = fit_std(sv, n, m)
        out.update(std=std, edge=mp_edge(std, n, m))
    if w0 is not None:
        ref = w0 if isinstance(w0, dict) else init_reference(w0)
        sv0 = ref["sv"]
        if edge == "mp":
            out.update(std=ref["std"], edge=mp_edge(ref["std"], n, m))
        elif edge == "init":
            out.update(std=ref["std"], edge=float(sv0[0]))
        dsv = singular_values(w - ref["w"])
        norm2, normf = float(sv0[0]), float(np.sqrt(np.sum(sv0**2)))
        out.update(
            init_spectral_norm=norm2,
            init_frobenius=normf,
            delta_spectral=float(dsv[0]),
            delta_frobenius=float(np.sqrt(np.sum(dsv**2))),
            delta_top=dsv[:top_k].tolist(),
            delta_stable_rank=stable_rank(dsv),
        )
        moved = math.inf if dsv[0] > 0 else 0.0  # relative to a zero init (e.g. zero_init_query)
        out["rel_delta_spectral"] = out["delta_spectral"] / norm2 if norm2 else moved
        out["rel_delta_frobenius"] = out["delta_frobenius"] / normf if normf else moved
    out["edge_method"] = edge
    outliers = sv[sv > out["edge"] * (1 + tol)]
    out.update(n_outliers=int(len(outliers)), outliers=outliers.tolist())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Every hidden matrix of a params pytree


def matrices(cfg, params: dict, roles: tuple[str, ...] = HIDDEN_ROLES) -> Iterator[dict]:
    """{name, kind, layer, expert, w (2-D [fan-in, fan-out])} for every matrix of a role in `roles`, in parameter
    order; `layer` counts over the whole depth (dense stack first, then the MoE stack)."""
    offsets = {"blocks": 0, "moe_blocks": transformer.stack_depths(cfg).get("blocks", 0)}
    for path, spec, _ in transformer.param_specs(cfg):
        if spec.role not in roles:
            continue
        leaf = params
        for key in path.split("/"):
            leaf = leaf[key]
        arr = np.asarray(leaf)
        index = [a for a in spec.axes if a == "layers" or (a == "experts" and spec.role.startswith("expert"))]
        rows = [a for a in spec.axes if a in spec.fan_in]
        cols = [a for a in spec.axes if a not in index and a not in rows]
        order = [spec.axes.index(a) for a in index + rows + cols]
        lead = tuple(arr.shape[spec.axes.index(a)] for a in index)
        n = math.prod(arr.shape[spec.axes.index(a)] for a in rows)
        flat = np.transpose(arr, order).reshape(lead + (n, -1))
        stack, kind = path.split("/")[0], path.split("/")[-1]
        for idx in np.ndindex(*lead):
            at = dict(zip(index, idx))
            layer = offsets.get(stack, 0) + at.get("layers", 0)
            expert = at.get("experts")
            name = f"{kind}/{layer}" + (f"/e{expert}" if expert is not None else "")
            yield {"name": name, "kind": kind, "layer": layer, "expert": expert, "w": flat[idx]}


def init_references(cfg, params0: dict, roles=HIDDEN_ROLES) -> dict:
    """{matrix name: init_reference} of a params pytree (W_0): pass as `refs` to `spectra` at many steps."""
    return {m["name"]: init_reference(m["w"]) for m in matrices(cfg, params0, roles)}


def spectra(cfg, params: dict, params0: dict | None = None, roles=HIDDEN_ROLES, refs=None, **kw) -> list[dict]:
    """`spectrum` of every hidden matrix of `params` (against `params0`, e.g. the run at step 0, or its
    precomputed `refs`): a list of dicts with the matrix's name, kind, layer and expert. Works on any two params
    pytrees of one config."""
    base = refs if refs is not None else init_references(cfg, params0, roles) if params0 is not None else {}
    out = []
    for m in matrices(cfg, params, roles):
        row = spectrum(m["w"], base.get(m["name"]), **kw)
        row.pop("sv")
        out.append({k: m[k] for k in ("name", "kind", "layer", "expert")} | row)
    return out


SERIES = ("top", "edge", "n_outliers", "stable_rank", "rel_delta_spectral", "rel_delta_frobenius", "delta_top")


def trajectory(run: runs_lib.Run, steps: list[int] | None = None, **kw) -> dict:
    """Spectra of one run at `steps` (default: 0, rebuilt from the seed if not kept, and every kept step), each
    against W_0: {"run", "config": {width, seed, parameterization}, "steps", "matrices": {name: {kind, layer,
    expert, shape, <series>: [one value per step]}}}."""
    steps = sorted(set([0] + run.steps())) if steps is None else sorted(steps)
    refs = init_references(run.config, run.params(0), kw.get("roles", HIDDEN_ROLES))
    flat = run.flat_config()
    out = {
        "run": run.id,
        "config": {k: flat.get(k) for k in ("model.width", "train.seed", "parameterization.name")},
        "steps": steps,
        "matrices": {},
    }
    for step in steps:
        for row in spectra(run.config, run.params(step), refs=refs, **kw):
            entry = out["matrices"].setdefault(
                row["name"], {k: row[k] for k in ("kind", "layer", "expert", "shape")} | {s: [] for s in SERIES}
            )
            for s in SERIES:
                entry[s].append(row.get(s))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def markdown(trajs: list[dict]) -> str:
    lines = [
        "Hidden-matrix spectra at the last step of each run (edge: bulk edge of W_0; outliers: singular values above "
        "it; dW = W_t - W_0)",
        "",
    ]
    for t in trajs:
        c = t["config"]
        lines += [
            f"run {t['run']} (width {c['model.width']}, seed {c['train.seed']}, {c['parameterization.name']}), "
            f"step {t['steps'][-1]}",
            "",
            "| matrix | shape | edge | s_1 | s_1 / edge | outliers | stable rank | ||dW||_2 / ||W_0||_2 | "
            "||dW||_F / ||W_0||_F |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in t["matrices"].items():
            e, s1 = m["edge"][-1], m["top"][-1][0]
            ratio = f"{s1 / e:.3f}" if e else "-"
            rel2, relf = m["rel_delta_spectral"][-1], m["rel_delta_frobenius"][-1]
            lines.append(
                f"| {name} | {m['shape'][0]}x{m['shape'][1]} | {e:.4g} | {s1:.4g} | {ratio} | {m['n_outliers'][-1]} "
                f"| {m['stable_rank'][-1]:.2f} | {_num(rel2)} | {_num(relf)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def plot_top_k(trajs: list[dict], path: str, k: int = 4, layer: int | None = None) -> None:
    """One panel per matrix kind: the top-k singular values over training divided by the init bulk edge (the mean
    over layers and experts, or one `layer`), one colour per width, line style per seed; s_1 bold."""
    plt = runs_lib.pyplot()
    kinds = list(dict.fromkeys(m["kind"] for t in trajs for m in t["matrices"].values())) or ["(no matrices)"]
    conf = [t["config"] for t in trajs]
    style = runs_lib.WidthStyle(plt, [c["model.width"] for c in conf], [c["train.seed"] for c in conf])
    cols = min(len(kinds), 4)
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.8 * rows), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        for t, c in zip(trajs, conf):
            sel = [m for m in t["matrices"].values() if m["kind"] == kind and layer in (None, m["layer"])]
            if not sel:
                continue
            edge0 = np.array([m["edge"][0] or np.nan for m in sel])[:, None, None]
            top = np.array([[row[:k] for row in m["top"]] for m in sel], np.float64)  # [matrices, steps, k]
            curve = np.nanmean(top / edge0, axis=0)
            for i in range(curve.shape[1]):
                label = f"width {c['model.width']}" if i == 0 and c["train.seed"] == style.seeds[0] else None
                kw = style(c["model.width"], c["train.seed"])
                ax.plot(t["steps"], curve[:, i], lw=1.6 if i == 0 else 0.7, label=label, **kw)
        ax.axhline(1.0, color="grey", lw=0.5, ls=":")
        ax.set_title(kind + ("" if layer is None else f" (layer {layer})"), fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"top-{k} singular values / init edge", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def report(path: str, out_dir: str | None = None, steps=None, top_k=8, edge="mp", tol=0.05, layer=None) -> list:
    """Spectra of every run under `path` (a run or a sweep directory); writes spectra.json/.md/.png to `out_dir`."""
    trajs = [trajectory(r, steps, edge=edge, tol=tol, top_k=top_k) for r in runs_lib.open_runs(path)]
    out_dir = out_dir or path
    runs_lib.write_outputs(out_dir, "spectra", {"runs": trajs}, markdown(trajs))
    plot_top_k(trajs, os.path.join(out_dir, "spectra.png"), k=min(top_k, 4), layer=layer)
    return trajs


def main(argv: list[str]) -> int:
    p = runs_lib.parser("maxscale.analysis.spectra", __doc__)
    p.add_argument("path", help="a run directory or a sweep directory (runs/<sweep>)")
    p.add_argument("--steps", type=runs_lib.step_list, default=None, help="e.g. 0,50,100 (default: 0, every kept)")
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--edge", choices=EDGES, default="mp")
    p.add_argument("--tol", type=float, default=0.05, help="outliers lie above edge x (1 + tol)")
    p.add_argument("--layer", type=int, default=None, help="plot one layer (default: mean over layers)")
    p.add_argument("--out", default=None, help="output directory (default: PATH)")

    def body(args):
        trajs = report(args.path, args.out, args.steps, args.top_k, args.edge, args.tol, args.layer)
        print(markdown(trajs), end="")
        print(f"wrote {os.path.join(args.out or args.path, 'spectra.md')}, spectra.json and spectra.png")

    return runs_lib.cli_main(p, argv, body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
