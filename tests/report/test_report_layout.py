"""The report as a reader sees it: nothing drawn outside a chart's canvas (1- and 2-GPU reports, where the
fit matrix's titles and colour-bar label used to be cut), one fixed colour scale for headroom in every
report, and the dashed GPU lines described only where they are drawn."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from matplotlib.axis import Tick  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import memplan  # noqa: E402
from memplan.catalogue import load_gpu  # noqa: E402
from memplan.report import sweep, write_report  # noqa: E402
from memplan.report import charts as C  # noqa: E402
from memplan.report.html import CHARTS, LINE_CHARTS, _meta, build_charts, gpu_lines_text  # noqa: E402

#: small grids: one GPU, two GPUs (one that cannot run the bf16 plan), and a mix whose GPU lines are
#: partly on the breakdown's scale
REPORTS = {
    "1-gpu": (["llama-3.2-1b"], ["a10g"]),
    "2-gpu": (["llama-3.2-1b", "qwen2.5-7b"], ["t4", "a100-80gb"]),
    "3-gpu-lines": (["llama-3-8b"], ["t4", "a10g", "h200"]),
}


def _sweep(name):
    models, gpus = REPORTS[name]
    return sweep(models, gpus, seq_lens=(512, 2048), batch_sizes=(1,), progress=False)


@pytest.fixture(scope="module", params=list(REPORTS))
def built(request):
    df = _sweep(request.param)
    return request.param, df, build_charts(df, _meta(df))


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = {}
    for name in REPORTS:
        df = _sweep(name)
        res = write_report(df, tmp_path_factory.mktemp(name))
        out[name] = (df, build_charts(df, _meta(df)), Path(res["html"]).read_text(encoding="utf-8"))
    return out


# ---------------------------------------------------------------------------------------------
# nothing outside the canvas
# ---------------------------------------------------------------------------------------------
def _outside(fig) -> list[str]:
    """What `fig` draws outside its canvas: every visible non-empty text (suptitle, titles, axis and
    colour-bar labels, cell and bar labels, legend entries), every legend, and each axes' tight box
    (which holds the tick labels actually drawn, secondary axes' GPU names included)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    canvas = fig.bbox
    ticks = {id(t) for tick in fig.findobj(Tick) for t in (tick.label1, tick.label2)}
    found: list[tuple[str, object]] = []
    for a in fig.findobj(lambda o: isinstance(o, (Text, Legend))):
        if isinstance(a, Text) and (id(a) in ticks or not a.get_text().strip()):
            continue
        if a.get_visible():
            found.append((f"{type(a).__name__} {a.get_text()[:50]!r}" if isinstance(a, Text) else "legend",
                          a.get_window_extent(r)))
    for i, ax in enumerate(fig.axes):
        if ax.get_visible():
            found.append((f"axes {i} ({ax.get_title()[:30]!r}, {ax.get_xlabel()[:30]!r})", ax.get_tightbbox(r)))
    found.append(("the figure's tight box", fig.get_tightbbox(r).transformed(fig.dpi_scale_trans)))
    tol = 1.0  # pixel
    return [f"{what}: {box.extents.round(1).tolist()} not in {canvas.extents.round(1).tolist()}"
            for what, box in found
            if box.x0 < canvas.x0 - tol or box.y0 < canvas.y0 - tol or box.x1 > canvas.x1 + tol
            or box.y1 > canvas.y1 + tol]


def test_every_chart_of_the_report_is_built(built):
    _, _, figs = built
    assert set(figs) == set(CHARTS)


@pytest.mark.parametrize("chart", list(CHARTS))
def test_every_text_lies_inside_the_canvas(built, chart):
    name, _, figs = built
    fig = figs[chart]
    assert fig.get_suptitle(), "every chart has a title"
    assert not _outside(fig), (name, chart, _outside(fig))


def test_fit_matrix_titles_and_colour_bar_label_are_inside_the_canvas(built):
    """The issue's case by name: suptitle, subtitle and colour-bar label of the 1- and 2-GPU matrices."""
    _, _, figs = built
    fig = figs["fit-matrix"]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax, cax = fig.axes[0], fig.axes[1]
    label = cax.xaxis.label if cax.xaxis.label.get_text() else cax.yaxis.label
    (suptitle,) = [t for t in fig.findobj(Text) if t.get_text() == fig.get_suptitle()]
    for text in (suptitle, ax.title, label):
        assert text.get_text()
        assert fig.bbox.contains(*text.get_window_extent(r).min) and fig.bbox.contains(*text.get_window_extent(r).max)
    assert ax.get_window_extent(r).height > 20, "the matrix keeps its room"


def test_estimate_chart_lies_inside_the_canvas():
    from memplan.report.charts import estimate_chart

    for gpu in (None, "t4", "a100-40gb"):
        e = memplan.estimate("llama-3-8b", gpu=gpu, method="full", optim="adamw_torch")
        fig = estimate_chart(e)
        assert not _outside(fig), (gpu, _outside(fig))


def test_long_subtitles_wrap_and_the_figure_grows_to_hold_them():
    cells = [{"model": "m", "gpu": "a10g", "headroom_bytes": 2**30, "max_batch_size": 1, "fits": True,
              "gpu_note": "", "error": ""}]
    fig = C.fit_matrix_chart(cells, ["m"], [load_gpu("a10g")], "a subtitle that goes on " * 30)
    assert "\n" in fig.axes[0].get_title()
    assert not _outside(fig)
    size = tuple(fig.get_size_inches())
    assert C.fit_canvas(fig) is fig and tuple(fig.get_size_inches()) == size, "idempotent once it fits"


# ---------------------------------------------------------------------------------------------
# one colour scale
# ---------------------------------------------------------------------------------------------
def _image(figs):
    (im,) = figs["fit-matrix"].axes[0].get_images()
    return im


def test_same_headroom_same_colour_in_every_report(pages):
    """+9.3 GiB was pale in a report whose best cell had +74 GiB and dark in one whose best had +17."""
    images = [_image(figs) for _, figs, _ in pages.values()]
    for gib in (-60.0, -24.0, -9.3, -1.0, -0.01, 0.0, 0.5, 9.3, 16.7, 24.0, 74.2):
        colours = {tuple(im.to_rgba(gib)) for im in images}
        assert colours == {C.headroom_rgba(gib)}, gib
    for im in images:
        assert (im.norm.vmin, im.norm.vmax) == (-C.FIT_SCALE_GIB, C.FIT_SCALE_GIB)


def test_cells_are_coloured_by_their_own_headroom(pages):
    for df, figs, _ in pages.values():
        im = _image(figs)
        models, gpus = list(dict.fromkeys(df["model"])), sorted(
            dict.fromkeys(df["gpu"]), key=lambda g: load_gpu(g).memory_bytes)
        head = df[df["seq_len"] == 2048]
        arr = im.get_array()
        for r in head.to_dict("records"):
            i, j = models.index(r["model"]), gpus.index(r["gpu"])
            if r["gpu_note"]:
                assert arr.mask[i, j], "grey: cannot run as planned"
            else:
                assert arr[i, j] == pytest.approx(r["headroom_bytes"] / 2**30)
                assert tuple(im.to_rgba(arr[i, j])) == C.headroom_rgba(r["headroom_bytes"] / 2**30)


def test_scale_ends_and_zero():
    red_end, green_end = C.headroom_rgba(-C.FIT_SCALE_GIB), C.headroom_rgba(C.FIT_SCALE_GIB)
    assert C.headroom_rgba(-1000) == red_end and C.headroom_rgba(1000) == green_end, "clipped beyond the scale"
    assert C.headroom_rgba(-0.01)[0] > C.headroom_rgba(-0.01)[1], "below zero: red"
    assert C.headroom_rgba(0.01)[1] > C.headroom_rgba(0.01)[0], "above zero: green"


def test_the_scale_is_stated_in_the_legend_and_the_page(pages):
    for _, figs, html in pages.values():
        cax = figs["fit-matrix"].axes[1]
        label = (cax.xaxis.label.get_text() + cax.yaxis.label.get_text()).replace("\n", " ")
        assert f"±{C.FIT_SCALE_GIB:.0f} GiB" in label and "same in every report" in label
        section = re.search(r"<section id='fit-matrix'>(.*?)</section>", html, re.S).group(1)
        assert "fixed scale" in section and f"{C.FIT_SCALE_GIB:.0f} GiB" in section


# ---------------------------------------------------------------------------------------------
# dashed GPU lines: described where drawn, and only there
# ---------------------------------------------------------------------------------------------
def test_dashed_line_sentence_only_where_lines_are_drawn(pages):
    seen = set()
    for name, (df, figs, html) in pages.items():
        for key in LINE_CHARTS:
            section = re.search(rf"<section id='{key}'><h2>[^<]*</h2><p>([^<]*)</p>", html).group(1)
            drawn = C.gpu_lines_drawn(figs[key])
            assert ("Dashed line" in section) == bool(drawn), (name, key, drawn, section)
            for gpu in drawn:
                assert gpu in section
            seen.add(bool(drawn))
        for key in set(CHARTS) - set(LINE_CHARTS):
            assert "Dashed line" not in html.split(f"<section id='{key}'>")[1].split("</section>")[0]
    assert seen == {True, False}, "the reports cover both cases"


def test_one_gpu_report_promises_no_lines(pages):
    _, figs, html = pages["1-gpu"]
    assert C.gpu_lines_drawn(figs["breakdown"]) == []
    assert "Dashed line" not in html and "No dashed GPU line: a10g has more memory" in html


def test_gpu_lines_drawn_reads_the_lines_on_the_chart(pages):
    _, figs, _ = pages["3-gpu-lines"]
    drawn = C.gpu_lines_drawn(figs["breakdown"])
    assert "t4" in drawn and "h200" not in drawn
    ymax = figs["breakdown"].axes[0].get_ylim()[1]
    for g in drawn:
        assert load_gpu(g).memory_bytes / 2**30 <= ymax


@pytest.mark.parametrize("drawn, gpus, expect", [
    ([], ["a10g"], "No dashed GPU line: a10g has more memory than the chart's scale."),
    ([], ["t4", "h200"], "No dashed GPU line: t4, h200 have more memory than the chart's scale."),
    (["t4"], ["t4"], "Dashed line: the memory of t4 (named on the right)."),
    (["t4", "a10g"], ["t4", "a10g", "h200"],
     "Dashed lines: the memory of t4, a10g (named on the right). h200: more memory than the chart's scale, no line."),
    ([], [], ""),
])
def test_gpu_lines_text(drawn, gpus, expect):
    assert gpu_lines_text(drawn, gpus) == expect
