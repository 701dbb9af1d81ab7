"""matplotlib charts for reports and notebooks, in GiB, labelled for a reader who never saw memplan.

Every function returns a `matplotlib.figure.Figure` built with the object API (no pyplot, so no global
backend or figure registry is touched); `to_png(fig)` renders it.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator

from .. import present as P
from ..estimate import Estimate, Moment
from ..gpu import GPUSpec
from ..present import METHOD_LABELS
from ..terms import ALLOCATED_TERMS, Term
from ..units import GiB

#: Plain-words names for the terms (DESIGN.md, "One vocabulary"), true for every method: each is a short
#: form of `Term.definition` (base_weights are the decoder's Linear weights, trained in a full fine-tune).
TERM_LABELS = {
    Term.BASE_WEIGHTS: "base weights (decoder Linear layers)",
    Term.QUANT_STATE: "quantization constants",
    Term.OTHER_PARAMS: "embeddings, norms, lm_head",
    Term.ADAPTER_WEIGHTS: "trainable weights (LoRA adapters)",
    Term.GRADIENTS: "gradients",
    Term.OPTIMIZER_STATE: "optimizer state",
    Term.ACTIVATIONS: "activations saved for backward",
    Term.LOGITS: "logits and loss buffers",
    Term.TEMPORARIES: "temporary buffers",
    Term.WORKSPACE: "cuBLAS workspace",
    Term.ALLOCATOR_OVERHEAD: "allocator overhead (reserved - allocated)",
    Term.CUDA_CONTEXT: "CUDA context",
    Term.COMM_BUFFERS: "collective buffers (distributed)",
}
#: One colour per term, the same in every chart: weights in blues, training state in greens/oranges,
#: per-token memory in reds, device overheads in greys.
TERM_COLORS = {
    Term.BASE_WEIGHTS: "#1f4e79",
    Term.QUANT_STATE: "#6c8ebf",
    Term.OTHER_PARAMS: "#9ecae1",
    Term.ADAPTER_WEIGHTS: "#31a354",
    Term.GRADIENTS: "#a1d99b",
    Term.OPTIMIZER_STATE: "#fd8d3c",
    Term.ACTIVATIONS: "#d62728",
    Term.LOGITS: "#f4a6a6",
    Term.TEMPORARIES: "#9467bd",
    Term.WORKSPACE: "#c7c7c7",
    Term.ALLOCATOR_OVERHEAD: "#8c8c8c",
    Term.CUDA_CONTEXT: "#4d4d4d",
    Term.COMM_BUFFERS: "#bcbd22",
}
PAGED_LABEL = "paged optimizer state (CUDA managed memory, not counted in the fit)"
#: The fit matrix's colour scale, the same in every report: headroom in GiB from -FIT_SCALE_GIB (darkest
#: red) through 0 (the change from red to green) to +FIT_SCALE_GIB (darkest green); beyond it, clipped.
FIT_SCALE_GIB = 24.0
#: the GID of each dashed GPU-memory line a chart draws, "gpu-line:<gpu name>" (see `gpu_lines_drawn`)
GPU_LINE_GID = "gpu-line:"
#: why a sweep row has no numbers, by `MemplanError.error_kind` (the sweep's error_kind column)
ERROR_LABELS = {
    "unsupported_architecture": "not estimated:\nno closed form,\nuse simulate",
    "invalid_spec": "not estimated:\ninvalid plan",
    "unknown_name": "not estimated:\nunknown name",
    "missing_extra": "not estimated:\nextra missing",
}
_METHOD_TICKS = {"qlora": "QLoRA", "lora": "LoRA", "full": "full\nfine-tune"}


def _wrap(text: str, width: int = 110) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _chars(width_in: float, fontsize: float) -> int:
    """How many characters of DejaVu Sans at `fontsize` points fit in `width_in` inches (a safe
    average: 0.56 em per character)."""
    return max(20, int(width_in * 72 / (0.56 * fontsize)))


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def fit_canvas(fig: Figure, pad: float = 0.06, rounds: int = 5) -> Figure:
    """Grow `fig` until everything it draws lies inside its canvas, then return it.

    Constrained layout places axes, colour bars and "outside" legends, but a suptitle, legend or
    colour-bar label longer than the figure itself would still be cut at the edge: measure what was
    drawn (`Figure.get_tightbbox`) and add the overflow, plus `pad` inches, to the figure's size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    for _ in range(rounds):
        fig.canvas.draw()
        box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
        w, h = fig.get_size_inches()
        dx = max(0.0, -box.x0) + max(0.0, box.x1 - w)
        dy = max(0.0, -box.y0) + max(0.0, box.y1 - h)
        if dx <= 0 and dy <= 0:
            break
        fig.set_size_inches(w + (dx + 2 * pad if dx > 0 else 0), h + (dy + 2 * pad if dy > 0 else 0))
    return fig


def gpu_lines_drawn(fig: Figure) -> list[str]:
    """The GPUs whose memory a chart shows as a dashed line (only those within its y range are drawn)."""
    names = [str(a.get_gid())[len(GPU_LINE_GID):] for ax in fig.axes for a in ax.get_lines()
             if str(a.get_gid() or "").startswith(GPU_LINE_GID)]
    return list(dict.fromkeys(names))


def _gib(n: float) -> float:
    return float(n) / GiB


def _tokens(n: float, _pos: Any = None) -> str:
    n = int(round(n))
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


def _legend_terms(fig: Figure, used: Sequence[Term], paged: bool = False, ncol: int = 4,
                  extra: Sequence[Patch] = ()) -> None:
    """The terms' colours under the figure, in as many columns (at most `ncol`) as its width holds;
    `extra`: more entries after the terms (e.g. the host's loading part)."""
    labels = [TERM_LABELS[t] for t in used] + ([_wrap(PAGED_LABEL, 40)] if paged else [])
    handles = [Patch(facecolor=TERM_COLORS[t], label=TERM_LABELS[t]) for t in used]
    if paged:
        handles.append(Patch(facecolor="white", edgecolor="#fd8d3c", hatch="///", label=labels[-1]))
    handles += list(extra)
    labels += [h.get_label() for h in extra]
    longest = max((len(line) for lab in labels for line in lab.split("\n")), default=1)
    col_in = (longest * 0.6 * 9 + 40) / 72  # text + handle + spacing, inches
    fits = max(1, int((fig.get_size_inches()[0] - 0.2) / col_in))
    fig.legend(handles=handles, loc="outside lower center", ncol=max(1, min(ncol, fits, len(handles))),
               fontsize=9, frameon=False)


def _stack(ax: Any, x: Sequence[float], stacks: Sequence[Mapping[Term, float]], used: Sequence[Term],
           width: float, paged: Sequence[float] | None = None) -> list[float]:
    """Stacked bars in GiB; returns each bar's total (without the paged part)."""
    bottoms = [0.0] * len(x)
    for t in used:
        h = [_gib(s.get(t, 0)) for s in stacks]
        ax.bar(x, h, width, bottom=bottoms, color=TERM_COLORS[t], edgecolor="white", linewidth=0.4)
        bottoms = [b + v for b, v in zip(bottoms, h)]
    if paged is not None and any(paged):
        ax.bar(x, [_gib(p) for p in paged], width, bottom=bottoms, facecolor="white", edgecolor="#fd8d3c",
               hatch="///", linewidth=0.6)
    return bottoms


def _used_terms(stacks: Sequence[Mapping[Term, float]]) -> list[Term]:
    return [t for t in Term if any(s.get(t, 0) for s in stacks)]


def _merge_close(gpu_lines: Sequence[tuple[str, float]], span: float, frac: float = 0.045
                 ) -> list[tuple[float, str]]:
    """GPUs whose memory lies within `frac` of the axis `span` of a group's first GPU share one label,
    so that labels never overprint: [(position, label)]."""
    groups: list[list[tuple[str, float]]] = []
    for name, gib in sorted(gpu_lines, key=lambda x: x[1]):
        if groups and gib - groups[-1][0][1] <= frac * span:
            groups[-1].append((name, gib))
        else:
            groups.append([(name, gib)])
    out = []
    for g in groups:
        sizes = sorted({round(x) for _, x in g})
        size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        names = " / ".join(n for n, _ in g) if len(g) <= 2 else f"{g[0][0]} ... {g[-1][0]} ({len(g)} GPUs)"
        out.append((sum(x for _, x in g) / len(g), f"{names}: {size} GiB"))
    return out


def _gpu_lines(ax: Any, gpu_lines: Sequence[tuple[str, float]], ymax: float) -> None:
    """Dashed horizontal lines at each GPU's memory (GiB), named on a right-hand axis, when in view."""
    shown = [(n, g) for n, g in gpu_lines if g <= ymax]
    for name, gib in shown:
        ax.axhline(gib, color="#333333", linestyle="--", linewidth=0.8, zorder=0.5, gid=GPU_LINE_GID + name)
    sec = ax.secondary_yaxis("right")
    merged = _merge_close(shown, ymax)
    sec.set_yticks([p for p, _ in merged], [label for _, label in merged], fontsize=8, color="#333333")
    sec.tick_params(length=0)
    sec.spines["right"].set_visible(False)


def _grid(n: int, ncols: int = 3) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return (n + ncols - 1) // ncols, ncols


# ---------------------------------------------------------------------------------------------
# fit matrix
# ---------------------------------------------------------------------------------------------
def fit_matrix_chart(cells: Sequence[Mapping[str, Any]], models: Sequence[str], gpus: Sequence[GPUSpec],
                     subtitle: str) -> Figure:
    """Models x GPUs coloured by headroom (GiB, red = does not fit) on the fixed scale of
    `fit_norm` (the same colour means the same headroom in every report); each cell names the largest
    micro-batch that fits. `cells`: dicts with model, gpu, headroom_bytes, max_batch_size, fits,
    gpu_note, error."""
    by = {(c["model"], c["gpu"]): c for c in cells}
    vals = [[_cell_headroom(by.get((m, g.name))) for g in gpus] for m in models]
    width = max(8.0, 1.45 * len(gpus) + 3.2)
    fig = Figure(figsize=(width, max(4.2, 0.62 * len(models) + 3.4)), layout="constrained")
    ax = fig.add_subplot()
    masked = [[(v if v is not None else float("nan")) for v in row] for row in vals]
    cmap = _fit_cmap()
    im = ax.imshow(masked, cmap=cmap, norm=fit_norm(), aspect="auto")
    for i, m in enumerate(models):
        for j, g in enumerate(gpus):
            c = by.get((m, g.name))
            text, v = _cell_text(c), vals[i][j]
            dark = v is not None and _luminance(im.to_rgba(v)) < 0.45
            ax.text(j, i, text, ha="center", va="center", fontsize=8.5, color="white" if dark else "black")
    ax.set_xticks(range(len(gpus)), [f"{g.name}\n{g.memory_bytes / GiB:.0f} GiB" for g in gpus], fontsize=9)
    ax.set_yticks(range(len(models)), list(models), fontsize=9)
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False)
    ax.set_xticks([x - 0.5 for x in range(1, len(gpus))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(models))], minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    cb = fig.colorbar(im, ax=ax, location="bottom", extend="both", shrink=0.85, aspect=40, pad=0.02)
    cb.set_ticks(np.arange(-FIT_SCALE_GIB, FIT_SCALE_GIB + 1, FIT_SCALE_GIB / 4))
    cb.ax.tick_params(labelsize=8.5)
    cb.set_label(_wrap(FIT_SCALE_TEXT, _chars(width - 0.4, 9)), fontsize=9)
    title = "Does it fit? Headroom per model and GPU, with the largest micro-batch that fits"
    fig.suptitle(_wrap(title, _chars(width - 0.3, 12)), fontsize=12)
    ax.set_title(_wrap(subtitle, _chars(width - 0.3, 9)), fontsize=9, color="#444444")
    return fit_canvas(fig)


#: the fit matrix's colour-bar label: what the colour is, and its fixed scale
FIT_SCALE_TEXT = (f"headroom: GPU memory left at the peak (GiB); red = does not fit, grey = not estimated or "
                  f"cannot run as planned. Fixed scale, the same in every report: 0 is where red turns green, "
                  f"the darkest shades are ±{FIT_SCALE_GIB:.0f} GiB or more")


def fit_norm() -> Normalize:
    """The fit matrix's colour scale: headroom GiB -> [0, 1], -FIT_SCALE_GIB -> 0, 0 -> 0.5,
    +FIT_SCALE_GIB -> 1, whatever the report; headroom beyond ±FIT_SCALE_GIB takes the end colours."""
    return Normalize(vmin=-FIT_SCALE_GIB, vmax=FIT_SCALE_GIB, clip=True)


def headroom_rgba(headroom_gib: float) -> tuple[float, float, float, float]:
    """The colour of a fit-matrix cell with this headroom (GiB), in every report."""
    return tuple(float(x) for x in _fit_cmap()(fit_norm()(headroom_gib)))  # type: ignore[return-value]


def _luminance(rgba: Sequence[float]) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _fit_cmap() -> ListedColormap:
    """Reds below zero (does not fit), greens above (fits): the boundary is a change of hue, not of shade."""
    reds = colormaps["Reds_r"](np.linspace(0.1, 0.72, 128))
    greens = colormaps["Greens"](np.linspace(0.28, 0.88, 128))
    return ListedColormap(np.vstack([reds, greens]), name="memplan_fit").with_extremes(bad="#e6e6e6")


def error_label(kind: Any) -> str:
    """A short label for a row that could not be estimated, from its error_kind (never its message)."""
    return ERROR_LABELS.get(str(kind or ""), "not estimated\n(see notes)")


def _cell_headroom(c: Mapping[str, Any] | None) -> float | None:
    if c is None or c.get("error") or c.get("headroom_bytes") is None or c.get("gpu_note"):
        return None  # grey: not estimated, or the GPU cannot run the plan as planned (whatever the headroom)
    try:
        return _gib(int(c["headroom_bytes"]))
    except (TypeError, ValueError):
        return None


def _cell_text(c: Mapping[str, Any] | None) -> str:
    if c is None:
        return ""
    if c.get("error"):
        return error_label(c.get("error_kind"))
    h = P.gib(c["headroom_bytes"], 1, signed=True)
    mb = None if P.is_missing(c.get("max_batch_size")) else int(c["max_batch_size"])
    if c.get("gpu_note"):  # the one rule (memplan.fit.gpu_support): not a fit, whatever the headroom
        return "cannot run\nas planned\n" + ("(no bf16)" if "bf16" in c["gpu_note"] else "(unsupported)")
    if c.get("fits"):
        text = f"batch ≤ {mb}\n{h} GiB" if mb is not None else f"fits\n{h} GiB"
    else:
        text = f"does not fit\n{h} GiB"
    return text


# ---------------------------------------------------------------------------------------------
# per-term breakdown
# ---------------------------------------------------------------------------------------------
def breakdown_chart(per_model: Mapping[str, Sequence[tuple[int, Mapping[Term, int], int]]],
                    gpu_lines: Sequence[tuple[str, float]], subtitle: str) -> Figure:
    """One panel per model: stacked per-term bars (GiB) for each sequence length, with the GPUs'
    memory as dashed lines. `per_model[name]` = [(seq_len, terms, paged_bytes), ...]."""
    names = list(per_model)
    nrows, ncols = _grid(len(names))
    width = max(8.5, 5.2 * ncols + 0.6)
    fig = Figure(figsize=(width, 3.5 * nrows + 2.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    all_stacks = [s for rows in per_model.values() for _, s, _ in rows]
    used = _used_terms(all_stacks)
    any_paged = any(p for rows in per_model.values() for *_, p in rows)
    for k, name in enumerate(names):
        ax = axes[k // ncols][k % ncols]
        rows = per_model[name]
        x = list(range(len(rows)))
        tops = _stack(ax, x, [s for _, s, _ in rows], used, 0.7, [p for *_, p in rows])
        ymax = max(tops + [0.1]) * 1.25
        for xi, top in zip(x, tops):
            ax.annotate(f"{top:.1f}", (xi, top), xytext=(0, 2), textcoords="offset points", ha="center",
                        fontsize=8)
        _gpu_lines(ax, gpu_lines, ymax)
        ax.set_ylim(0, ymax)
        ax.set_xticks(x, [_tokens(s) for s, _, _ in rows])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("sequence length (tokens)", fontsize=9)
        ax.set_ylabel("peak memory on the GPU (GiB)", fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    for k in range(len(names), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    title = "Where the memory goes: each term at the peak of a training step (GiB)"
    fig.suptitle(f"{_wrap(title, _chars(width - 0.3, 11))}\n{_wrap(subtitle, _chars(width - 0.3, 11))}",
                 fontsize=11)
    _legend_terms(fig, used, paged=any_paged, ncol=3)
    return fit_canvas(fig)


def estimate_chart(e: Estimate) -> Figure:
    """One estimate, term by term (horizontal bars in GiB), with the GPU's memory when known."""
    terms = [t for t in Term if e.terms.get(t, 0)]
    fig = Figure(figsize=(9, 0.42 * len(terms) + 2.2), layout="constrained")
    ax = fig.add_subplot()
    vals = [_gib(e.terms[t]) for t in terms]
    ax.barh(range(len(terms)), vals, color=[TERM_COLORS[t] for t in terms])
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.2f} GiB", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8.5)
    ax.set_yticks(range(len(terms)), [TERM_LABELS[t] for t in terms], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("GiB at the peak of one training step", fontsize=9)
    ax.set_xlim(0, max(vals + [0.1]) * 1.22)
    ax.spines[["top", "right"]].set_visible(False)
    what = f"{e.model.name}, {P.plan_brief(e.plan)}"
    total = f"peak {P.gib(e.device_bytes)} GiB on the device (phase: {e.peak_phase})"
    if e.gpu is not None:
        total += f"; {e.gpu.name} has {P.gib(e.gpu.memory_bytes)} GiB -> {P.verdict(bool(e.fits))}"
    if e.paged_bytes:
        total += f"; plus {P.gib(e.paged_bytes)} GiB of paged optimizer state in CUDA managed memory (not counted)"
    fig.suptitle(f"Where the memory goes: {_wrap(what, 95)}\n{_wrap(total, 95)}", fontsize=10.5)
    return fit_canvas(fig)


# ---------------------------------------------------------------------------------------------
# max sequence length vs GPU memory
# ---------------------------------------------------------------------------------------------
def max_seq_chart(curves: Mapping[str, tuple[Sequence[float], Sequence[int]]],
                  points: Sequence[tuple[str, str, float, int]], gpu_lines: Sequence[tuple[str, float]],
                  subtitle: str) -> Figure:
    """Longest sequence that fits (log scale) against GPU memory (GiB), one curve per model.

    `curves[model]` = (device GiB needed, seq_len) pairs; `points` = (model, gpu, GPU GiB, exact max
    seq len) drawn as dots on each swept GPU's memory line."""
    fig = Figure(figsize=(9, 5.6), layout="constrained")
    ax = fig.add_subplot()
    colors = {}
    for name, (mem, seq) in curves.items():
        (line,) = ax.plot(mem, seq, linewidth=1.8, label=name)
        colors[name] = line.get_color()
    for model, _gpu, gib, ms in points:
        if ms > 0:
            ax.plot([gib], [ms], "o", color=colors.get(model, "black"), markersize=5, zorder=3)
    xmax = max([g for _, g in gpu_lines] + [1.0]) * 1.08
    for _, gib in gpu_lines:
        ax.axvline(gib, color="#555555", linestyle=":", linewidth=1, zorder=0.5)
    top = ax.secondary_xaxis("top")
    merged = _merge_close(gpu_lines, xmax, frac=0.03)
    top.set_xticks([p for p, _ in merged], [label for _, label in merged], fontsize=8, rotation=45,
                   ha="left", rotation_mode="anchor")
    top.tick_params(length=0)
    ax.set_xlim(0, xmax)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(LogLocator(base=2))
    ax.yaxis.set_major_formatter(FuncFormatter(_tokens))
    ax.set_xlabel("GPU memory (GiB)", fontsize=10)
    ax.set_ylabel("longest sequence that fits (tokens, log scale)", fontsize=10)
    ax.grid(True, which="major", color="#e5e5e5")
    ax.legend(title="model", fontsize=9, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("Longest training sequence that fits, by GPU memory\n" + _wrap(subtitle, _chars(8.7, 11)),
                 fontsize=11)
    return fit_canvas(fig)


# ---------------------------------------------------------------------------------------------
# QLoRA vs LoRA vs full
# ---------------------------------------------------------------------------------------------
def methods_chart(per_model: Mapping[str, Mapping[str, tuple[Mapping[Term, int], int]]],
                  gpu_lines: Sequence[tuple[str, float]], subtitle: str) -> Figure:
    """One panel per model: QLoRA, LoRA and full fine-tuning side by side, stacked by term (GiB).
    `per_model[name][method]` = (terms, paged_bytes)."""
    names = list(per_model)
    nrows, ncols = _grid(len(names))
    width = max(8.5, 5.2 * ncols + 0.6)
    fig = Figure(figsize=(width, 3.7 * nrows + 2.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    all_stacks = [s for d in per_model.values() for s, _ in d.values()]
    used = _used_terms(all_stacks)
    any_paged = any(p for d in per_model.values() for _, p in d.values())
    for k, name in enumerate(names):
        ax = axes[k // ncols][k % ncols]
        d = per_model[name]
        methods = list(d)
        x = list(range(len(methods)))
        tops = _stack(ax, x, [d[m][0] for m in methods], used, 0.62, [d[m][1] for m in methods])
        ymax = max(t + _gib(d[m][1]) for t, m in zip(tops, methods)) * 1.2
        for xi, top in zip(x, tops):
            ax.annotate(f"{top:.1f}", (xi, top), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
        _gpu_lines(ax, gpu_lines, ymax)
        ax.set_ylim(0, ymax)
        ax.set_xticks(x, [_METHOD_TICKS.get(m, m) for m in methods], fontsize=9)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("peak memory on the GPU (GiB)", fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    for k in range(len(names), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    title = "QLoRA vs LoRA vs full fine-tuning: peak memory by term (GiB)"
    fig.suptitle(f"{_wrap(title, _chars(width - 0.3, 11))}\n{_wrap(subtitle, _chars(width - 0.3, 11))}",
                 fontsize=11)
    _legend_terms(fig, used, paged=any_paged, ncol=3)
    return fit_canvas(fig)


# ---------------------------------------------------------------------------------------------
# memory over one step
# ---------------------------------------------------------------------------------------------
_MOMENT_LABELS = {"forward": "forward\n(last layer)", "loss_forward": "loss\nforward",
                  "loss_backward": "loss\nbackward", "optimizer": "optimizer\nstep"}


def moment_label(m: Moment, num_layers: int) -> str:
    """A two-line axis label for one of the estimator's moments."""
    if m.layer is None or m.kind == "forward":
        return _MOMENT_LABELS.get(m.kind, m.name)
    which = f"layer {m.layer}" + (" (last)" if m.layer == num_layers - 1 else " (first)" if m.layer == 0 else "")
    what = {"recompute": "recompute", "dequant": "4-bit bwd", "attention_backward": "attention bwd",
            "post_norm_backward": "norm bwd"}.get(m.kind, "MLP bwd")
    return f"{which}\n{what}"


def timeline_chart(e: Estimate, gpu: GPUSpec | None = None, source: str = "estimator phase model") -> Figure:
    """Stacked bytes by term at each moment of one steady-state training step (GiB), the peak marked."""
    gpu = gpu or e.gpu
    keys = list(e.moments)  # in step order
    stacks = [m.terms for m in keys]
    used = [t for t in ALLOCATED_TERMS if any(s.get(t, 0) for s in stacks)]
    fig = Figure(figsize=(max(8.0, 1.25 * len(keys) + 2.5), 5.6), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(keys)))
    tops = _stack(ax, x, stacks, used, 0.68)
    peak_i = max(x, key=lambda i: tops[i]) if x else 0
    for xi, top in zip(x, tops):
        ax.annotate(f"{top:.1f}", (xi, top), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8,
                    fontweight="bold" if xi == peak_i else "normal")
    ymax = max(tops + [_gib(e.device_bytes), 0.1]) * 1.18
    if gpu is not None and _gib(gpu.memory_bytes) <= 2.5 * ymax:  # show the GPU's line unless it squashes the bars
        ymax = max(ymax, _gib(gpu.memory_bytes) * 1.06)
    ax.axhline(_gib(e.device_bytes), color="#d62728", linestyle="-.", linewidth=1)
    ax.annotate(f"peak on the device incl. allocator overhead + CUDA context: {_gib(e.device_bytes):.1f} GiB",
                xy=(0.0, _gib(e.device_bytes)), xycoords=("axes fraction", "data"), xytext=(3, 2),
                textcoords="offset points", fontsize=8, color="#d62728")
    if gpu is not None:
        _gpu_lines(ax, [(gpu.name, _gib(gpu.memory_bytes))], ymax)
    ax.set_ylim(0, ymax)
    ax.set_xticks(x, [moment_label(m, e.model.num_layers) for m in keys], fontsize=8.5)
    ax.set_xlabel("moments of one training step, in order (time runs left to right; not to scale)", fontsize=9)
    ax.set_ylabel("bytes allocated by torch (GiB)", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    p = e.plan
    what = f"{e.model.name}, {METHOD_LABELS.get(p.method, p.method)}"
    if p.method != "full":
        what += f" r={p.lora_r}"
    what += (f", micro-batch {p.batch_size} x {p.seq_len} tokens, checkpointing "
             f"{'on' if p.gradient_checkpointing else 'off'}, {p.optim}")
    fig.suptitle("Memory over one training step", fontsize=12)
    width = fig.get_size_inches()[0]
    ax.set_title(f"{_wrap(what, _chars(width - 0.3, 9))}\n(source: {source}; bold = the peak)", fontsize=9,
                 color="#444444")
    _legend_terms(fig, used, ncol=3)
    return fit_canvas(fig)


# ---------------------------------------------------------------------------------------------
# several GPUs: every rank, and the host RAM of each node
# ---------------------------------------------------------------------------------------------
#: the host bar's part that is the model while from_pretrained loads it (memplan.distributed `host`)
LOADING_LABEL = "model while loading (host RAM)"
LOADING_COLOR = "#dadaeb"


def _host_terms(host: Mapping[str, int]) -> tuple[dict[Term, int], int]:
    """A node's host RAM (`Estimate.host`: Term values and "loading") as (terms, loading bytes)."""
    terms = {Term(k): int(v) for k, v in host.items() if k in Term._value2member_map_}
    return terms, int(host.get("loading", 0))


def ranks_chart(e: Estimate, gpu: GPUSpec | None = None, source: str = "closed form") -> Figure:
    """A distributed plan per rank and per node: one stacked bar per rank (its terms at its own peak,
    `Estimate.ranks`; `comm_buffers` in its colour), the GPU's memory as a dashed line; beside them, on
    their own scale, one stacked bar per node of host RAM (`Estimate.host`: offloaded state and the
    model while loading)."""
    gpu = gpu or e.gpu
    ranks = list(e.ranks)
    if not ranks:
        raise ValueError("ranks_chart needs a distributed plan's estimate (Estimate.ranks is empty)")
    nodes = max(1, int(getattr(e.plan, "num_machines", 1) or 1))
    host_terms, loading = _host_terms(e.host)
    stacks = [r.terms for r in ranks]
    used = _used_terms(stacks + [host_terms])
    host_used = [t for t in Term if host_terms.get(t, 0)]
    width = max(9.0, 0.55 * len(ranks) + 0.7 * nodes + 6.0)
    fig = Figure(figsize=(width, 5.8), layout="constrained")
    ax, hax = fig.subplots(1, 2, width_ratios=[max(2.0, len(ranks)), max(1.4, 1.2 * nodes)])
    x = list(range(len(ranks)))
    tops = _stack(ax, x, stacks, used, 0.7)
    ymax = max(tops + [0.1]) * 1.2
    if gpu is not None and _gib(gpu.memory_bytes) <= 2.5 * ymax:  # as the timeline: unless it squashes the bars
        ymax = max(ymax, _gib(gpu.memory_bytes) * 1.06)
    for xi, top in zip(x, tops):
        ax.annotate(f"{top:.1f}", (xi, top), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
    if gpu is not None:
        _gpu_lines(ax, [(gpu.name, _gib(gpu.memory_bytes))], ymax)
    ax.set_ylim(0, ymax)
    ax.set_xticks(x, [f"rank {r.rank}" for r in ranks], fontsize=8.5,
                  rotation=45 if len(ranks) > 8 else 0)
    ax.set_xlabel("GPU of each process (its peak)", fontsize=9)
    ax.set_ylabel("peak memory on the GPU (GiB)", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    hx = list(range(nodes))
    htops = _stack(hax, hx, [host_terms] * nodes, host_used, 0.6)
    if loading:
        hax.bar(hx, [_gib(loading)] * nodes, 0.6, bottom=htops, facecolor=LOADING_COLOR, edgecolor="#6a51a3",
                hatch="..", linewidth=0.6)
    htotal = [t + _gib(loading) for t in htops]
    for xi, top in zip(hx, htotal):
        hax.annotate(f"{top:.1f}", (xi, top), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
    hax.set_ylim(0, max(htotal + [0.1]) * 1.2)
    hax.set_xlim(-0.7, nodes - 0.3)
    hax.set_xticks(hx, [f"node {i}" for i in hx], fontsize=8.5)
    hax.set_xlabel("host of each node", fontsize=9)
    hax.set_ylabel("host (CPU) RAM (GiB)", fontsize=9)
    hax.spines[["top", "right"]].set_visible(False)
    p = e.plan
    what = f"{e.model.name}, {P.plan_brief(p)}"
    total = f"busiest rank {P.gib(e.device_bytes)} GiB on the device (phase: {e.peak_phase})"
    if gpu is not None:
        total += f"; {gpu.name} has {P.gib(gpu.memory_bytes)} GiB"
    total += f"; host RAM {P.gib(e.host_bytes)} GiB per node"
    fig.suptitle(f"Several GPUs: each rank's peak and each node's host RAM ({source})\n"
                 f"{_wrap(what, _chars(width - 0.3, 10.5))}\n{_wrap(total, _chars(width - 0.3, 10.5))}",
                 fontsize=10.5)
    extra = [Patch(facecolor=LOADING_COLOR, edgecolor="#6a51a3", hatch="..", label=LOADING_LABEL)] if loading else []
    _legend_terms(fig, used, ncol=3, extra=extra)
    return fit_canvas(fig)


# ---------------------------------------------------------------------------------------------
# several GPUs: per-rank memory against the world size, one line per strategy
# ---------------------------------------------------------------------------------------------
#: one colour per strategy of a world grid (the single GPU is the common first point of every line)
STRATEGY_COLORS = {"ddp": "#7f7f7f", "fsdp": "#1f77b4", "deepspeed": "#d62728"}


def worlds_chart(panels: Mapping[tuple[str, str], Mapping[str, Sequence[tuple[int, float, bool]]]],
                 gpu_gib: Mapping[str, float], subtitle: str, labels: Mapping[str, str] | None = None) -> Figure:
    """Per-rank peak (GiB) against the number of GPUs, one panel per (model, GPU) and one line per
    strategy. `panels[(model, gpu)][strategy]` = [(GPUs, busiest rank's device GiB, fits)]: a filled
    marker where every rank fits the GPU, a hollow one where it does not; `gpu_gib[gpu]`: the GPU's
    memory, a dashed line in its panel; `labels[strategy]`: its legend text (e.g. "fsdp FULL_SHARD"). The
    x axis is the swept world sizes, evenly spaced."""
    keys = list(panels)
    if not keys:
        raise ValueError("worlds_chart needs at least one (model, GPU) panel")
    worlds = sorted({n for k in keys for pts in panels[k].values() for n, _, _ in pts})
    pos = {n: i for i, n in enumerate(worlds)}
    nrows, ncols = _grid(len(keys), 3)
    width = max(8.0, 4.2 * ncols)
    fig = Figure(figsize=(width, 3.5 * nrows + 1.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    strategies: list[str] = []
    for ax, key in zip(axes, keys):
        model, gpu = key
        ymax = 0.1
        for st, pts in panels[key].items():
            pts = sorted(pts)
            if st not in strategies:
                strategies.append(st)
            color = STRATEGY_COLORS.get(st, "#2ca02c")
            ax.plot([pos[n] for n, _, _ in pts], [g for _, g, _ in pts], "-", color=color, linewidth=1.6, zorder=2)
            for n, g, ok in pts:
                ax.plot([pos[n]], [g], "o", color=color, markersize=6, zorder=3,
                        markerfacecolor=color if ok else "white", markeredgewidth=1.4)
            ymax = max([ymax] + [g for _, g, _ in pts])
        ymax *= 1.15
        mem = gpu_gib.get(gpu)
        if mem is not None and mem <= 2.5 * ymax:
            ymax = max(ymax, mem * 1.08)
        if mem is not None:
            _gpu_lines(ax, [(gpu, mem)], ymax)
        ax.set_ylim(0, ymax)
        ax.set_xlim(-0.4, len(worlds) - 0.6)
        ax.set_xticks(range(len(worlds)), [str(n) for n in worlds], fontsize=8.5)
        ax.set_xlabel("GPUs (processes)", fontsize=9)
        ax.set_ylabel("per-rank peak (GiB)", fontsize=9)
        ax.set_title(f"{model} on {gpu}", fontsize=9.5)
        ax.grid(True, axis="y", color="#e5e5e5")
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    handles = [Patch(facecolor=STRATEGY_COLORS.get(st, "#2ca02c"), label=(labels or {}).get(st, st))
               for st in strategies]
    handles += [Patch(facecolor="white", edgecolor="#333333", label="hollow: does not fit (or the GPU cannot run the plan)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8.5, frameon=False)
    fig.suptitle("Several GPUs: the busiest rank's peak against the number of GPUs\n"
                 + _wrap(subtitle, _chars(width - 0.3, 10.5)), fontsize=10.5)
    return fit_canvas(fig)
