"""The capacity-planning report: one self-contained HTML file (charts embedded as base64 PNG), the
same charts as PNG files, and the sweep as CSV (and Parquet when pyarrow imports).

Charts that show one plan use the report's *headline plan*: the first method of the sweep (QLoRA
when swept), rank 16 when swept (else the first rank), sequence length 2048 when swept (else the
middle one), the smallest micro-batch, on the first GPU given. The page states it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from .. import __version__
from ..catalogue import load_gpu, load_model
from ..errors import MemplanError
from ..estimate import Estimate, estimate
from ..formulas import MODELED_VERSIONS
from ..gpu import GPUSpec
from ..model import ModelSpec
from ..plan import TrainPlan
from ..present import gib, is_missing, plan_brief, plan_text
from ..search import MAX_SEQ_LEN
from ..terms import Term
from ..units import GiB
from . import charts as C
from ..fileio import write_bytes_atomic, write_text_atomic
from .files import prepare_out_dir
from .sweep import row_plan, sweep

#: section id -> (PNG file, heading)
CHARTS = {
    "fit-matrix": ("fit_matrix.png", "Fit matrix: which model fits which GPU"),
    "breakdown": ("breakdown.png", "Where the memory goes"),
    "max-seq-len": ("max_seq_len.png", "Longest sequence vs GPU memory"),
    "methods": ("methods.png", "QLoRA vs LoRA vs full fine-tuning"),
    "timeline": ("timeline.png", "Memory over one training step"),
}
#: charts drawn only when the sweep's plan is distributed (--num-processes / --strategy): id -> (PNG, heading)
DISTRIBUTED_CHARTS = {
    "ranks": ("ranks.png", "Several GPUs: per rank and per node"),
    "worlds": ("worlds.png", "Several GPUs: per-rank memory against the number of GPUs"),
}
ALL_CHARTS = {**CHARTS, **DISTRIBUTED_CHARTS}
MAX_TABLE_ROWS = 2000
#: the charts that draw a dashed line at a GPU's memory when it lies within their y range (the breakdown
#: and methods charts: every GPU of the report; the timeline: the first GPU)
LINE_CHARTS = ("breakdown", "methods", "timeline")
#: the distributed charts that draw the first GPU's line (when within their y range)
DISTRIBUTED_LINE_CHARTS = ("ranks", "worlds")


def _meta(df: pd.DataFrame) -> dict[str, Any]:
    """The sweep's settings (from df.attrs, or read back from the columns of a loaded CSV)."""
    m = dict(df.attrs.get("memplan", {}))
    if "models" not in m:
        m["models"] = {n: load_model(n) for n in dict.fromkeys(df["model"])}
    if "gpus" not in m:
        m["gpus"] = {n: load_gpu(n) for n in dict.fromkeys(df["gpu"])}
    m.setdefault("methods", tuple(dict.fromkeys(df["method"])))
    m.setdefault("ranks", tuple(int(r) for r in dict.fromkeys(df["lora_r"].dropna())) or (16,))
    m.setdefault("seq_lens", tuple(int(s) for s in dict.fromkeys(df["seq_len"])))
    m.setdefault("batch_sizes", tuple(int(b) for b in dict.fromkeys(df["batch_size"])))
    m.setdefault("plan_kwargs", {})
    m.setdefault("reserve_bytes", 0)
    if "num_processes" in df.columns:  # a sweep over worlds (sweep's WORLD_COLUMNS)
        m.setdefault("worlds", tuple(sorted(int(n) for n in dict.fromkeys(df["num_processes"]))))
        m.setdefault("strategies", tuple(st for st in dict.fromkeys(df["strategy"]) if st != "single"))
    return m


def headline(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The one plan the single-plan charts show (see the module docstring)."""
    methods, ranks, seqs = list(meta["methods"]), list(meta["ranks"]), sorted(meta["seq_lens"])
    method = "qlora" if "qlora" in methods else methods[0]
    h = {"method": method, "rank": None if method == "full" else (16 if 16 in ranks else ranks[0]),
         "seq_len": 2048 if 2048 in seqs else seqs[len(seqs) // 2],
         "batch_size": min(meta["batch_sizes"])}
    if meta.get("worlds"):  # a sweep over worlds: the largest world with the first strategy (one GPU if alone)
        from ..distributed import world_fields

        n, strategies = max(meta["worlds"]), list(meta.get("strategies") or ())
        h["world"] = (world_fields(n, {"strategy": strategies[0]}) if n > 1 and strategies else
                      {"num_processes": 1, "num_machines": 1, "strategy": "single"})
    return h


def headline_plan(meta: Mapping[str, Any], h: Mapping[str, Any]) -> TrainPlan:
    """The headline plan: the shared plan fields, the headline grid values and (a world grid) world."""
    return row_plan(dict(meta["plan_kwargs"], **h.get("world", {})), h["method"], h["rank"], h["seq_len"],
                    h["batch_size"])


def _select(df: pd.DataFrame, h: Mapping[str, Any], **extra: Any) -> pd.DataFrame:
    m = (df["method"] == h["method"]) & (df["batch_size"] == h["batch_size"])
    m &= df["lora_r"].isna() if h["rank"] is None else (df["lora_r"] == h["rank"])
    if h.get("world") and "num_processes" in df.columns:
        m &= (df["num_processes"] == h["world"]["num_processes"]) & (df["strategy"] == h["world"]["strategy"])
    for k, v in extra.items():
        m &= df[k] == v
    return df[m]


def _closed_form(spec: ModelSpec, plan: TrainPlan, gpu: GPUSpec) -> Estimate:
    """The charts' estimates: closed form only, like the sweep (a simulate trace per point would take
    minutes); a model without one raises UnsupportedArchitectureError and its curve is left out."""
    return estimate(spec, plan, gpu=gpu, fallback_simulate=False)


def _terms_of(row: Mapping[str, Any]) -> dict[Term, int]:
    return {t: int(row[f"{t.value}_bytes"]) for t in Term}


# ---------------------------------------------------------------------------------------------
# the figures
# ---------------------------------------------------------------------------------------------
def build_charts(df: pd.DataFrame, meta: Mapping[str, Any], timeline: tuple[Any, TrainPlan] | None = None
                 ) -> dict[str, Any]:
    """section id -> matplotlib Figure, plus the data tables the HTML shows next to them."""
    h = headline(meta)
    specs: dict[str, ModelSpec] = meta["models"]
    gpus = sorted(meta["gpus"].values(), key=lambda g: g.memory_bytes)
    first_gpu: GPUSpec = next(iter(meta["gpus"].values()))
    base = dict(meta["plan_kwargs"], **h.get("world", {}))
    hplan = headline_plan(meta, h)
    gpu_lines = [(g.name, g.memory_bytes / GiB) for g in gpus]
    ok = df[df["error"] == ""]
    figs: dict[str, Any] = {}

    # fit matrix at the headline plan
    cells = _select(df, h, seq_len=h["seq_len"]).to_dict("records")
    figs["fit-matrix"] = C.fit_matrix_chart(cells, list(specs), gpus,
                                            f"plan: {plan_brief(hplan)}; cell: largest micro-batch at seq "
                                            f"{h['seq_len']} and headroom at micro-batch {h['batch_size']}")

    # breakdown per model over the swept sequence lengths, on the first GPU
    per_model = {}
    for name in specs:
        rows = _select(ok, h, model=name, gpu=first_gpu.name).sort_values("seq_len").to_dict("records")
        if rows:
            per_model[name] = [(int(r["seq_len"]), _terms_of(r), int(r["paged_bytes"])) for r in rows]
    if per_model:
        figs["breakdown"] = C.breakdown_chart(per_model, gpu_lines,
                                              f"{plan_brief(hplan, seq=False)}; overheads of {first_gpu.name}")

    # max seq len vs GPU memory: curves from the closed form, dots = the sweep's exact answers
    curves, points = {}, []
    xmax = max(g.memory_bytes for g in gpus) * 1.1
    for name, spec in specs.items():
        pts = _select(ok, h, model=name, seq_len=h["seq_len"]).to_dict("records")
        if not pts:
            continue
        points += [(name, r["gpu"], meta["gpus"][r["gpu"]].memory_bytes / GiB, int(r["max_seq_len"]))
                   for r in pts if not is_missing(r["max_seq_len"])]
        curves[name] = _seq_curve(spec, hplan, gpus[-1], xmax)
    if curves:
        figs["max-seq-len"] = C.max_seq_chart(
            curves, points, gpu_lines,
            f"{plan_brief(hplan, seq=False)}; lines: closed form with {gpus[-1].name}'s overheads, "
            "dots: exact answer on each GPU")

    # methods side by side at the headline shape
    per_method: dict[str, dict[str, tuple[dict[Term, int], int]]] = {}
    for name, spec in specs.items():
        d = {}
        for method in ("qlora", "lora", "full"):
            try:
                p = row_plan({k: v for k, v in base.items() if k not in ("quant", "prepare")}, method,
                             None if method == "full" else (h["rank"] or 16), h["seq_len"], h["batch_size"])
                e = _closed_form(spec, p, first_gpu)
            except MemplanError:
                continue
            d[method] = (dict(e.terms), e.paged_bytes)
        if d:
            per_method[name] = d
    if per_method:
        figs["methods"] = C.methods_chart(
            per_method, gpu_lines,
            f"micro-batch {h['batch_size']} x seq {h['seq_len']}, LoRA r={h['rank'] or 16}, "
            f"{hplan.optim} for every method; overheads of {first_gpu.name}")

    # timeline of one plan
    spec_t, plan_t = (resolve_timeline(timeline) if timeline else (None, None))
    for name, spec in ([(spec_t.name, spec_t)] if spec_t else specs.items()):
        try:
            e = _closed_form(spec, plan_t or hplan, first_gpu)
        except MemplanError:
            continue
        figs["timeline"] = C.timeline_chart(e, first_gpu)
        break

    # several GPUs: per-rank peak against the number of GPUs, per strategy (a sweep over worlds only)
    if meta.get("worlds") and "num_processes" in df.columns:
        panels: dict[tuple[str, str], dict[str, list[tuple[int, float, bool]]]] = {}
        sel = _select(ok, {**h, "world": None}, seq_len=h["seq_len"])
        for r in sel.to_dict("records"):
            pt = (int(r["num_processes"]), int(r["device_bytes"]) / GiB, bool(r["fits"]))
            lines = panels.setdefault((r["model"], r["gpu"]), {})
            for st in ([r["strategy"]] if r["strategy"] != "single" else list(meta.get("strategies") or ())):
                lines.setdefault(st, []).append(pt)  # one GPU: the first point of every strategy's line
        if panels:
            one = row_plan(dict(meta["plan_kwargs"]), h["method"], h["rank"], h["seq_len"], h["batch_size"])
            figs["worlds"] = C.worlds_chart(panels, {g.name: g.memory_bytes / GiB for g in gpus},
                                            f"{plan_brief(one)}; each strategy at the plan's own knobs; "
                                            "overheads of each GPU",
                                            {"ddp": "ddp", "fsdp": f"fsdp {one.fsdp_sharding_strategy}"
                                             + (" + cpu offload" if one.fsdp_offload_params else ""),
                                             "deepspeed": f"deepspeed ZeRO-{one.zero_stage}"
                                             + (" + offload optimizer" if one.offload_optimizer_device == "cpu"
                                                else "")
                                             + (" + params" if one.offload_param_device == "cpu" else "")})

    # several GPUs: every rank of the headline plan and the host RAM per node (a distributed plan only)
    if hplan.is_distributed:
        for spec in specs.values():
            try:
                e = _closed_form(spec, hplan, first_gpu)
            except MemplanError:
                continue
            if e.ranks:
                figs["ranks"] = C.ranks_chart(e, first_gpu)
                break
    return figs


def resolve_timeline(timeline: tuple[Any, TrainPlan]) -> tuple[ModelSpec, TrainPlan]:
    from ..catalogue import resolve_model

    model, plan = timeline
    return resolve_model(model), plan


def _seq_curve(spec: ModelSpec, plan: TrainPlan, gpu: GPUSpec, xmax_bytes: float) -> tuple[list[float], list[int]]:
    """(device GiB, seq_len) for seq_len on a geometric grid until the memory passes xmax_bytes."""
    mem, seq = [], []
    s = 64.0
    while s <= MAX_SEQ_LEN:
        n = int(s)
        try:
            d = _closed_form(spec, plan.replace(seq_len=n), gpu).device_bytes
        except MemplanError:
            break
        mem.append(d / GiB)
        seq.append(n)
        if d > xmax_bytes:
            break
        s *= 2 ** 0.25
    return mem, seq


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.meta{color:#555;font-size:.92em} nav a{margin-right:1em}
img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right} th{background:#f4f4f4}
td.name,th.name{text-align:left}
td.fit{background:#e3f4e1} td.nofit{background:#fbe3e3} td.na{background:#eee;color:#777}
.small{font-size:.85em;color:#555} code{background:#f4f4f4;padding:0 .2em}
"""


def _esc(x: Any) -> str:
    return _html.escape(str(x), quote=True)


def _gib_s(n: Any, signed: bool = False) -> str:
    return gib(n, signed=signed, na="–")


def _fit_table(df: pd.DataFrame, meta: Mapping[str, Any], h: Mapping[str, Any]) -> str:
    gpus = sorted(meta["gpus"].values(), key=lambda g: g.memory_bytes)
    sel = {(r["model"], r["gpu"]): r for r in _select(df, h, seq_len=h["seq_len"]).to_dict("records")}
    out = ['<table class="fit-matrix"><tr><th class="name">model</th>']
    out += [f"<th>{_esc(g.name)}<br>{gib(g.memory_bytes, 1)} GiB</th>" for g in gpus]
    out.append("</tr>")
    for name in meta["models"]:
        out.append(f'<tr><td class="name">{_esc(name)}</td>')
        for g in gpus:
            r = sel.get((name, g.name))
            if r is None or r["error"]:
                why = (C.error_label(r.get("error_kind")).replace("\n", " ") if r is not None
                       else "not in the sweep")
                out.append(f'<td class="na" data-model="{_esc(name)}" data-gpu="{_esc(g.name)}">{_esc(why)}</td>')
                continue
            cls = "fit" if r["fits"] else "nofit"
            mb = None if is_missing(r["max_batch_size"]) else int(r["max_batch_size"])
            ms = None if is_missing(r["max_seq_len"]) else int(r["max_seq_len"])
            text = ("cannot run as planned" if r["gpu_note"] else
                    f"batch ≤ {mb}" if r["fits"] and mb is not None else "fits" if r["fits"] else "does not fit")
            note = f'<br><span class="small">{_esc(r["gpu_note"].split(";")[0])}</span>' if r["gpu_note"] else ""
            out.append(f'<td class="{cls}" data-model="{_esc(name)}" data-gpu="{_esc(g.name)}" '
                       f'data-headroom-bytes="{int(r["headroom_bytes"])}" data-device-bytes="{int(r["device_bytes"])}" '
                       f'data-max-batch-size="{mb if mb is not None else ""}" '
                       f'data-max-seq-len="{ms if ms is not None else ""}">'
                       f'{text}<br>{_gib_s(r["headroom_bytes"], True)} GiB headroom<br>'
                       f'<span class="small">max seq {ms if ms is not None else "–"} at batch {h["batch_size"]}'
                       f'</span>{note}</td>')
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _rows_table(df: pd.DataFrame) -> str:
    cols = [("model", "model"), ("gpu", "GPU"), ("method", "method"), ("lora_r", "r"), ("seq_len", "seq len"),
            ("batch_size", "micro-batch"), ("device_bytes", "peak GiB"), ("headroom_bytes", "headroom GiB"),
            ("fits", "fits"), ("max_batch_size", "max batch"), ("max_seq_len", "max seq len"),
            ("peak_phase", "peak phase")]
    if "num_processes" in df.columns:  # a sweep over worlds: per rank, and the host RAM per node
        cols[6:6] = [("num_processes", "GPUs"), ("strategy", "strategy"), ("host_bytes", "host GiB per node")]
        cols[9] = ("device_bytes", "peak GiB per rank")
    out = ['<table class="rows"><tr>' + "".join(f"<th>{_esc(t)}</th>" for _, t in cols) + "</tr>"]
    for r in df.head(MAX_TABLE_ROWS).to_dict("records"):
        cells = []
        for c, _ in cols:
            v = r[c]
            if c in ("device_bytes", "headroom_bytes", "host_bytes"):
                s = _gib_s(v, signed=c == "headroom_bytes")
            elif is_missing(v):
                s = "–"
            elif c == "fits":
                s = "yes" if v else "no"
            else:
                s = str(v)
            cls = ' class="name"' if c in ("model", "gpu", "method", "peak_phase", "strategy") else ""
            cells.append(f"<td{cls}>{_esc(s)}</td>")
        dev = "" if is_missing(r["device_bytes"]) else int(r["device_bytes"])
        out.append(f'<tr data-device-bytes="{dev}">' + "".join(cells) + "</tr>")
    out.append("</table>")
    if len(df) > MAX_TABLE_ROWS:
        out.append(f'<p class="small">First {MAX_TABLE_ROWS} of {len(df)} rows; every row is in sweep.csv.</p>')
    return "".join(out)


_EXPLAIN = {
    "fit-matrix": "Each cell is one model on one GPU at the headline plan. Colour: the memory left at the "
                  "peak of a training step (green: room to spare, red: does not fit, grey: not estimated or "
                  "cannot run as planned), on a fixed scale that is the same in every report: red turns "
                  f"green at 0 GiB, and the darkest red and green are -{C.FIT_SCALE_GIB:.0f} and "
                  f"+{C.FIT_SCALE_GIB:.0f} GiB or beyond. Text: the largest micro-batch that fits at this "
                  "sequence length, the headroom, and the longest sequence that fits at the smallest "
                  "micro-batch.",
    "breakdown": "Each bar is the peak memory of one training step, split into where it goes. Base weights "
                 "and other parameters do not depend on the sequence; activations and logits grow with it.",
    "max-seq-len": "How long a training sequence each model can take as the GPU gets bigger. The curve starts "
                   "where the weights alone fill the GPU; the dots are the exact answers for the GPUs swept "
                   "(a binary search on whole tokens).",
    "methods": "The same model and batch trained three ways. QLoRA stores the frozen base in 4 bits, LoRA in "
               "16 bits; full fine-tuning trains every weight, so it also keeps their gradients and optimizer "
               "state. A paged optimizer keeps its state in CUDA managed memory (hatched): it is not counted "
               "against the GPU, and slows training when it pages.",
    "ranks": "The headline plan of the first model on several GPUs, on the first GPU given: one bar per "
             "process (rank), its terms at its own peak; the collective buffers (all-gather outputs, "
             "reduce-scatter and DDP buckets; NCCL's own buffers are outside torch and not counted) have their "
             "own colour. Ranks differ only where layers split unevenly. Beside them, on their own scale, the "
             "host (CPU) RAM of each node: the state the node's ranks offload (pinned) and the model while "
             "from_pretrained loads it. Every rank must fit its GPU and every node its host RAM.",
    "worlds": "For each model on each GPU, the peak of the busiest process (rank) as the job is spread over "
              "more GPUs, one line per strategy (each at the plan's own knobs: sharding strategy, ZeRO stage, "
              "offload), at the headline plan's method, rank, sequence length and micro-batch. The first point "
              "is one GPU. A filled marker: every rank fits the GPU; hollow: it does not, or the GPU cannot run the "
              "plan as planned (e.g. bf16 on a T4: see the notes below). DDP keeps the whole "
              "model on every GPU, so its line stays flat; FSDP and ZeRO-3 shard the weights, so theirs fall "
              "towards the activations, which every rank keeps for its own micro-batch. The host RAM per node "
              "of each point is in the rows table and sweep.csv (host_bytes).",
    "timeline": "The bytes torch has allocated at each moment the estimator checks for the peak of a "
                "steady-state step (step 2 onwards, optimizer state already created). The highest bar is "
                "the peak; the device also holds the allocator's cache and the CUDA context.",
}


def gpu_lines_text(drawn: Sequence[str], gpus: Sequence[str]) -> str:
    """The sentence under a chart about its dashed GPU-memory lines: which are drawn (`drawn`, from
    `charts.gpu_lines_drawn`) and which of `gpus` are above the chart's scale, so never promised lines
    that are not there."""
    drawn = [g for g in gpus if g in drawn] + [g for g in drawn if g not in gpus]
    off = [g for g in gpus if g not in drawn]
    if not drawn:
        if not off:
            return ""
        return (f"No dashed GPU line: {', '.join(off)} {'has' if len(off) == 1 else 'have'} more memory than "
                "the chart's scale.")
    text = f"Dashed line{'s' if len(drawn) > 1 else ''}: the memory of {', '.join(drawn)} (named on the right)."
    if off:
        text += f" {', '.join(off)}: more memory than the chart's scale, no line."
    return text


def build_html(df: pd.DataFrame, meta: Mapping[str, Any], pngs: Mapping[str, bytes],
               gpu_lines: Mapping[str, Sequence[str]] | None = None) -> str:
    """The page. `gpu_lines`: chart id -> the GPUs whose dashed memory line that chart draws
    (`charts.gpu_lines_drawn`); the page describes the lines of those charts only."""
    h = headline(meta)
    hplan = headline_plan(meta, h)
    worlds = (f" x GPUs {', '.join(map(str, meta['worlds']))} x strategies {', '.join(meta.get('strategies') or ())}"
              if meta.get("worlds") else "")
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    seconds = meta.get("seconds")
    speed = (f" in {seconds:.1f} s ({len(df) / seconds:,.0f} rows/s)" if seconds else "")
    first_gpu = next(iter(meta["gpus"].values()))
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>memplan capacity report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>GPU memory for fine-tuning: capacity report</h1>",
             f"<p class='meta'>memplan {__version__}, {now}. {len(df)} configurations: {len(meta['models'])} "
             f"model(s) x {len(meta['gpus'])} GPU(s) x methods {', '.join(meta['methods'])} x LoRA ranks "
             f"{', '.join(map(str, meta['ranks']))} x sequence lengths {', '.join(map(str, meta['seq_lens']))} x "
             f"micro-batches {', '.join(map(str, meta['batch_sizes']))}{worlds}{speed}.</p>",
             "<nav>" + "".join(f"<a href='#{k}'>{_esc(v[1])}</a>" for k, v in ALL_CHARTS.items() if k in pngs)
             + "<a href='#rows'>All rows</a><a href='#notes'>How to read this</a></nav>",
             f"<p><b>Headline plan</b> (used where a chart shows one plan): {_esc(plan_text(hplan))}; "
             f"GPU overheads of {_esc(first_gpu.name)} where one GPU is needed. Memory is in GiB (2<sup>30</sup> "
             f"bytes); a plan <i>fits</i> when its peak on the device plus the reserve "
             f"({gib(meta['reserve_bytes'])} GiB) is at most the GPU memory the driver reports.</p>"]
    for key, (fname, title) in ALL_CHARTS.items():
        if key not in pngs:
            continue
        b64 = base64.b64encode(pngs[key]).decode("ascii")
        explain = _EXPLAIN[key]
        if gpu_lines is not None and key in LINE_CHARTS + DISTRIBUTED_LINE_CHARTS:
            names = [first_gpu.name] if key in ("timeline", "ranks") else \
                [g.name for g in sorted(meta["gpus"].values(), key=lambda g: g.memory_bytes)]
            explain = f"{explain} {gpu_lines_text(gpu_lines.get(key, ()), names)}".strip()
        parts.append(f"<section id='{key}'><h2>{_esc(title)}</h2><p>{_esc(explain)}</p>"
                     f"<img alt='{_esc(title)}' src='data:image/png;base64,{b64}'>")
        if key == "fit-matrix":
            parts.append(_fit_table(df, meta, h))
        parts.append(f"<p class='small'>Also saved as <code>{fname}</code>.</p></section>")
    parts.append(f"<section id='rows'><h2>All rows</h2>{_rows_table(df)}"
                 "<p class='small'>Every column (each term in bytes) is in <code>sweep.csv</code>.</p></section>")
    parts.append(_notes_html(df, meta))
    parts.append("</body></html>")
    return "".join(parts)


def _notes_html(df: pd.DataFrame, meta: Mapping[str, Any]) -> str:
    items = []
    errors = df.loc[df["error"] != "", ["model", "error"]].drop_duplicates()
    for r in errors.to_dict("records"):
        items.append(f"<li><b>{_esc(r['model'])} not estimated</b>: {_esc(r['error'])}</li>")
    notes = df.loc[df["gpu_note"] != "", ["gpu", "gpu_note", "gpu_fix"]].drop_duplicates()
    for r in notes.to_dict("records"):
        fix = f" Run it with {r['gpu_fix']}." if r["gpu_fix"] else ""
        items.append(f"<li><b>{_esc(r['gpu'])}</b>: cannot run the plan as planned: {_esc(r['gpu_note'])} (its "
                     f"memory figures are shown anyway).{_esc(fix)}</li>")
    glossary = "".join(f"<li><code>{t.value}</code>, {_esc(C.TERM_LABELS[t])}: {_esc(t.definition)}</li>"
                       for t in Term)
    versions = ", ".join(f"{k} {v}" for k, v in MODELED_VERSIONS.items())
    return ("<section id='notes'><h2>How to read this</h2><ul>" + "".join(items) +
            "<li>Numbers are memplan's closed-form estimate of the peak of one steady-state training step "
            f"(it models the behaviour of {_esc(versions)}). Peak = what torch allocates, plus the caching "
            "allocator's overhead and the CUDA context.</li>"
            "<li>Max batch and max seq len are exact for the estimate: the largest whole number that fits, "
            "found by binary search (the next one up does not fit).</li>"
            "<li>Paged optimizers (paged_adamw_*) keep their state in CUDA managed memory; it is reported as "
            "<code>paged_bytes</code> and not counted against the GPU.</li>"
            f"</ul><p>Terms (columns <code>&lt;term&gt;_bytes</code> in sweep.csv):</p><ul>{glossary}</ul></section>")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def write_report(df: pd.DataFrame, out: str | Path, *, force: bool = False,
                 timeline: tuple[Any, TrainPlan] | None = None, checked: bool = False) -> dict[str, Any]:
    """Write report.html, sweep.csv (+ sweep.parquet with pyarrow) and the charts as PNG into `out`.

    An existing non-empty `out` needs `force` (then only the report's own files are overwritten).
    `timeline=(model, plan)` picks the plan of the memory-over-a-step chart (default: the headline
    plan of the first model). Returns {"out", "html", "files"}.
    """
    if len(df) == 0:
        raise MemplanError("the sweep is empty: nothing to report")
    path = Path(out) if checked else prepare_out_dir(out, force=force)
    meta = _meta(df)
    files = []
    figs = build_charts(df, meta, timeline)
    pngs = {k: C.to_png(f) for k, f in figs.items()}
    for key, data in pngs.items():
        p = path / ALL_CHARTS[key][0]
        write_bytes_atomic(p, data)
        files.append(str(p))
    csv = path / "sweep.csv"
    write_text_atomic(csv, df.to_csv(index=False))
    files.append(str(csv))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        import io

        buf = io.BytesIO()
        plain = df.copy()
        plain.attrs = {}
        plain.to_parquet(buf, index=False)
        pq = path / "sweep.parquet"
        write_bytes_atomic(pq, buf.getvalue())
        files.append(str(pq))
    for stale in [png for key, (png, _) in ALL_CHARTS.items() if key not in pngs] + \
            ([] if any(f.endswith("sweep.parquet") for f in files) else ["sweep.parquet"]):
        (path / stale).unlink(missing_ok=True)  # a report file from an earlier --force run, not rewritten now
    html_path = path / "report.html"
    drawn = {k: C.gpu_lines_drawn(f) for k, f in figs.items()}
    write_text_atomic(html_path, build_html(df, meta, pngs, drawn))
    files.insert(0, str(html_path))
    return {"out": str(path), "html": str(html_path), "files": files}


def run_report(models: Sequence[Any], gpus: Sequence[Any], *, out: str | Path, force: bool = False,
               progress: bool = True, checked: bool = False, **kwargs: Any) -> dict[str, Any]:
    """sweep + write_report: checks `out` first (unless the caller did: `checked`), returns the
    written files and the sweep's speed."""
    path = Path(out) if checked else prepare_out_dir(out, force=force)
    t0 = time.perf_counter()
    df = sweep(models, gpus, progress=progress, **kwargs)
    seconds = df.attrs["memplan"]["seconds"]
    if progress:  # the charts take seconds: say so
        print(f"memplan: drawing the charts and writing the report to {path}…", file=sys.stderr, flush=True)
    res = write_report(df, path, checked=True)
    return {"schema": "memplan.report/1", **res, "rows": len(df), "seconds": seconds,
            "rows_per_second": len(df) / seconds if seconds > 0 else None,
            "total_seconds": time.perf_counter() - t0}
