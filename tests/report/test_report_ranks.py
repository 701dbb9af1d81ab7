"""The per-rank chart of a distributed plan: one stacked bar per rank (the estimate's own per-rank
terms, comm_buffers in its colour), the host RAM per node beside it, and the report's section for it
only when the sweep's plan is distributed."""

from __future__ import annotations

import base64
import html as html_mod
import re
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

import memplan  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.report import charts as C  # noqa: E402
from memplan.report import sweep, write_report  # noqa: E402
from memplan.report.html import CHARTS, DISTRIBUTED_CHARTS  # noqa: E402
from memplan.terms import Term  # noqa: E402
from memplan.units import GiB  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
DIST = dict(num_processes=4, strategy="fsdp", fsdp_offload_params=True)


def _bars(ax):
    """(x centre, bottom, height) of every bar drawn on `ax`."""
    return [(round(p.get_x() + p.get_width() / 2, 6), p.get_y(), p.get_height()) for p in ax.patches]


def _tops(ax):
    tops: dict[float, float] = {}
    for x, y, h in _bars(ax):
        tops[x] = max(tops.get(x, 0.0), y + h)
    return [tops[x] for x in sorted(tops)]


@pytest.fixture(scope="module")
def est():
    return memplan.estimate("llama-3.1-70b", memplan.TrainPlan(seq_len=2048, **DIST), gpu="rtx-4090")


def test_one_bar_per_rank_with_the_estimates_per_rank_totals(est):
    fig = C.ranks_chart(est)
    ax, hax = fig.axes[0], fig.axes[-1]
    assert len(est.ranks) == 4
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"rank {r.rank}" for r in est.ranks]
    tops = _tops(ax)
    assert len(tops) == 4
    for top, r in zip(tops, est.ranks):
        assert top == pytest.approx(r.device_bytes / GiB, rel=1e-9)
    # the collective buffers are a bar segment of their own colour, as tall as the rank's comm_buffers
    comm = [p for p in ax.patches if p.get_facecolor()[:3] == pytest.approx(
        tuple(int(C.TERM_COLORS[Term.COMM_BUFFERS][i:i + 2], 16) / 255 for i in (1, 3, 5)))]
    assert len(comm) == 4 and est.ranks[0].terms[Term.COMM_BUFFERS] > 0
    assert comm[0].get_height() == pytest.approx(est.ranks[0].terms[Term.COMM_BUFFERS] / GiB)
    # one host bar per node, its total the estimate's host RAM per node (offloaded state + loading)
    assert [t.get_text() for t in hax.get_xticklabels()] == ["node 0"]
    assert _tops(hax) == [pytest.approx(est.host_bytes / GiB)]
    assert est.host.get("loading", 0) > 0 and est.host.get("base_weights", 0) > 0


def test_legend_names_comm_buffers_and_loading_and_the_gpu_line(est):
    fig = C.ranks_chart(est)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert C.TERM_LABELS[Term.COMM_BUFFERS] in labels
    assert C.LOADING_LABEL in labels
    assert C.gpu_lines_drawn(fig) == ["rtx-4090"]
    assert "4 processes" in fig.get_suptitle()
    w, h = fig.get_size_inches()
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    assert box.x0 >= -0.02 and box.y0 >= -0.02 and box.x1 <= w + 0.02 and box.y1 <= h + 0.02


def test_two_nodes_two_host_bars():
    e = memplan.estimate("qwen2.5-72b", memplan.TrainPlan(seq_len=4096, num_processes=16, num_machines=2,
                                                          strategy="deepspeed", zero_stage=3), gpu="l40s")
    fig = C.ranks_chart(e)
    assert len(_tops(fig.axes[0])) == 16
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["node 0", "node 1"]
    assert _tops(fig.axes[-1]) == [pytest.approx(e.host_bytes / GiB)] * 2


def test_a_single_gpu_estimate_has_no_per_rank_chart():
    e = memplan.estimate("llama-3.2-1b", memplan.TrainPlan(), gpu="a10g")
    with pytest.raises(ValueError, match="distributed"):
        C.ranks_chart(e)


def _section(html: str, key: str):
    m = re.search(rf"<section id='{key}'>(.*?)</section>", html, re.S)
    return m.group(1) if m else None


def test_report_of_a_distributed_sweep_has_the_per_rank_section(tmp_path):
    df = sweep(["llama-3.2-1b"], ["a10g", "t4"], seq_lens=(1024,), batch_sizes=(1,), progress=False,
               num_processes=2, strategy="fsdp")
    assert (df["comm_buffers_bytes"] > 0).all()
    res = write_report(df, tmp_path / "r")
    html = Path(res["html"]).read_text(encoding="utf-8")
    png, title = DISTRIBUTED_CHARTS["ranks"]
    body = _section(html, "ranks")
    assert body is not None and title in body and "collective buffers" in body
    (src,) = re.findall(r"<img [^>]*src='data:image/png;base64,([^']+)'", body)
    assert base64.b64decode(src).startswith(PNG)
    assert (tmp_path / "r" / png).read_bytes().startswith(PNG)
    # the page describes the line of the first GPU given only, as drawn (a 1B model's ranks are far below
    # 24 GiB: the line would squash the bars, so it is left out and the page says so)
    text = html_mod.unescape(body.split("<img")[0])
    assert "No dashed GPU line: a10g has more memory than the chart's scale." in text and "t4" not in text
    # a single-GPU report of the same folder (--force) has no such section, and the stale PNG is removed
    df1 = sweep(["llama-3.2-1b"], ["a10g"], seq_lens=(1024,), batch_sizes=(1,), progress=False)
    res1 = write_report(df1, tmp_path / "r", force=True)
    html1 = Path(res1["html"]).read_text(encoding="utf-8")
    assert _section(html1, "ranks") is None and "#ranks" not in html1
    assert not (tmp_path / "r" / png).exists()
    assert all(_section(html1, k) for k in CHARTS)


def test_cli_report_with_distributed_flags(capsys, tmp_path):
    out = tmp_path / "cli"
    rc = main(["report", "--models", "llama-3.2-1b", "--gpus", "rtx-4090", "--seq-lens", "512",
               "--batch-sizes", "1", "--num-processes", "2", "--strategy", "fsdp", "--out", str(out), "--quiet"])
    assert rc == 0
    assert (out / "ranks.png").read_bytes().startswith(PNG)
    assert _section((out / "report.html").read_text(encoding="utf-8"), "ranks")


def test_report_names_the_gpu_line_the_per_rank_chart_draws(tmp_path):
    df = sweep(["llama-3.1-70b"], ["rtx-4090"], seq_lens=(2048,), batch_sizes=(1,), progress=False, limits=False,
               **DIST)
    res = write_report(df, tmp_path / "r")
    text = html_mod.unescape(_section(Path(res["html"]).read_text(encoding="utf-8"), "ranks").split("<img")[0])
    assert "Dashed line: the memory of rtx-4090 (named on the right)." in text
