"""The report's grid over several GPUs (sweep worlds / strategies, `memplan report --num-processes 1,2,4
--strategy fsdp,deepspeed`): one row per (model, GPU, world, strategy) with the busiest rank's bytes and
the host RAM per node, each equal to `memplan.estimate` of that plan; the worlds chart draws them."""

from __future__ import annotations

import csv
import html as html_mod
import re
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

import memplan  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.report import charts as C  # noqa: E402
from memplan.report import sweep, write_report  # noqa: E402
from memplan.report.sweep import COLUMNS, WORLD_COLUMNS, world_columns, world_grid  # noqa: E402
from memplan.units import GiB  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def df():
    return sweep(["llama-3.1-70b"], ["rtx-4090", "l40s"], seq_lens=(2048,), batch_sizes=(1,), progress=False,
                 limits=False, worlds=(1, 2, 4, 16), strategies=("fsdp", "deepspeed"))


def test_one_row_per_world_and_strategy(df):
    assert tuple(df.columns) == world_columns() and set(WORLD_COLUMNS) < set(df.columns)
    assert len(df) == 2 * (1 + 3 * 2)  # GPUs x (one GPU once + 3 worlds x 2 strategies)
    one = df[df["num_processes"] == 1]
    assert list(one["strategy"]) == ["single", "single"] and (one["host_bytes"] == 0).all()
    sixteen = df[df["num_processes"] == 16]
    assert (sixteen["num_machines"] == 2).all()  # whole nodes of 8 beyond one node


def test_every_row_is_the_estimate_of_its_plan(df):
    for r in df.to_dict("records"):
        kw = {} if r["num_processes"] == 1 else dict(num_processes=r["num_processes"],
                                                     num_machines=r["num_machines"], strategy=r["strategy"])
        e = memplan.estimate("llama-3.1-70b", gpu=r["gpu"], seq_len=2048, **kw)
        assert (r["device_bytes"], r["host_bytes"], r["comm_buffers_bytes"]) == \
            (e.device_bytes, e.host_bytes, e.terms[memplan.Term.COMM_BUFFERS]), kw
        assert r["fits"] == (e.device_bytes <= r["gpu_memory_bytes"])
    # measured: 70B QLoRA at seq 2048 on RTX 4090 needs 4 GPUs with FSDP FULL_SHARD and with ZeRO-3
    fits = df[(df["gpu"] == "rtx-4090") & df["fits"]]
    assert sorted({(int(n), s) for n, s in zip(fits["num_processes"], fits["strategy"])}) == \
        [(4, "deepspeed"), (4, "fsdp"), (16, "deepspeed"), (16, "fsdp")]


def test_the_one_gpu_row_equals_a_plain_sweep(df):
    plain = sweep(["llama-3.1-70b"], ["rtx-4090"], seq_lens=(2048,), batch_sizes=(1,), progress=False, limits=False)
    assert tuple(plain.columns) == COLUMNS  # without worlds the columns are as before
    row = df[(df["num_processes"] == 1) & (df["gpu"] == "rtx-4090")][list(COLUMNS)].reset_index(drop=True)
    assert row.to_csv(index=False) == plain.to_csv(index=False)


def test_bad_grids_fail_in_one_line():
    with pytest.raises(MemplanError, match="whole nodes"):
        world_grid((12,), ("fsdp",))
    with pytest.raises(MemplanError, match="strategies"):
        sweep(["llama-3.2-1b"], ["a10g"], worlds=(2,), strategies=("zero9",), progress=False)
    with pytest.raises(MemplanError, match="grid dimensions"):
        sweep(["llama-3.2-1b"], ["a10g"], worlds=(2,), strategy="fsdp", progress=False)


def test_worlds_chart_draws_each_rows_bytes(df):
    panels = {}
    for r in df.to_dict("records"):
        for st in ([r["strategy"]] if r["strategy"] != "single" else ["fsdp", "deepspeed"]):
            panels.setdefault((r["model"], r["gpu"]), {}).setdefault(st, []).append(
                (int(r["num_processes"]), r["device_bytes"] / GiB, bool(r["fits"])))
    fig = C.worlds_chart(panels, {"rtx-4090": 23.99, "l40s": 44.99}, "test")
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["llama-3.1-70b on rtx-4090", "llama-3.1-70b on l40s"]
    ax = axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "16"]
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) == 4]
    want = {st: [g for _, g, _ in sorted(pts)] for st, pts in panels[("llama-3.1-70b", "rtx-4090")].items()}
    assert sorted(list(ln.get_ydata()) for ln in lines) == sorted(want.values())
    hollow = [ln for ln in ax.get_lines() if ln.get_marker() == "o" and ln.get_markerfacecolor() == "white"]
    assert len(hollow) == 2 * 2  # one GPU and two GPUs do not fit an RTX 4090, for both strategies
    assert C.gpu_lines_drawn(fig) == ["rtx-4090", "l40s"]
    w, h = fig.get_size_inches()  # nothing drawn outside the canvas
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    assert box.x0 >= -0.02 and box.y0 >= -0.02 and box.x1 <= w + 0.02 and box.y1 <= h + 0.02


def test_report_has_the_worlds_section_and_csv(df, tmp_path):
    res = write_report(df, tmp_path / "r")
    html = Path(res["html"]).read_text(encoding="utf-8")
    body = re.search(r"<section id='worlds'>(.*?)</section>", html, re.S).group(1)
    assert "per-rank memory against the number of GPUs" in body and "hollow" in html_mod.unescape(body)
    assert (tmp_path / "r" / "worlds.png").read_bytes().startswith(PNG)
    assert (tmp_path / "r" / "ranks.png").exists()  # the headline world (16 GPUs, fsdp) per rank
    assert "<th>GPUs</th><th>strategy</th><th>host GiB per node</th>" in html
    with open(tmp_path / "r" / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["num_processes"], r["strategy"]) for r in rows[:3]] == [("1", "single"), ("2", "fsdp"),
                                                                       ("2", "deepspeed")]
    assert int(rows[1]["host_bytes"]) == int(df.iloc[1]["host_bytes"]) > 0


def test_cli_grid_and_single_world(capsys, tmp_path):
    out = tmp_path / "grid"
    rc = main(["report", "--models", "llama-3.2-1b", "--gpus", "t4", "--seq-lens", "512", "--batch-sizes", "1",
               "--num-processes", "1,2", "--strategy", "fsdp,deepspeed", "--out", str(out), "--quiet"])
    assert rc == 0
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["num_processes"], r["strategy"]) for r in rows] == [("1", "single"), ("2", "fsdp"), ("2", "deepspeed")]
    assert (out / "worlds.png").exists()
    # one world and one strategy: the plan fields as before (no world columns), the per-rank chart
    one = tmp_path / "one"
    rc = main(["report", "--models", "llama-3.2-1b", "--gpus", "t4", "--seq-lens", "512", "--batch-sizes", "1",
               "--num-processes", "2", "--strategy", "fsdp", "--out", str(one), "--quiet"])
    assert rc == 0 and not (one / "worlds.png").exists() and (one / "ranks.png").exists()
    assert "num_processes" not in (one / "sweep.csv").read_text().splitlines()[0]
    capsys.readouterr()
    for argv, hint in ((["--num-processes", "12,16"], "whole nodes"), (["--strategy", "fsdp,zero"], "unknown"),
                       (["--num-processes", "2,x"], "integers")):
        rc = main(["report", "--models", "llama-3.2-1b", "--gpus", "t4", *argv, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("memplan: error:") and hint in err, err
