"""The one-command GPU check: profile a fixed matrix, write run records and an estimate-vs-measured table.

    scripts/gpu_check.sh                        # CUDA: tiny, 1B- and 8B-shaped random models (~6 min on an H200)
    scripts/gpu_check.sh --device cpu --tiny    # the same machinery on the CPU, in seconds (tested in CI)
    python -m memplan.profile.matrix --list     # the matrix, without running it

The CUDA matrix (random weights, no network; memory does not depend on weight values):
- tiny (2 layers, hidden 256): {qlora, lora} x {checkpointing on, off} x {paged_adamw_8bit, adamw_torch}
  x seq {256, 1024};
- 1B (llama-3.2-1b's config): qlora x {gc on, off} x {paged_adamw_8bit, adamw_torch} x seq {1024, 2048},
  and lora, gc on, both optimizers, seq 2048;
- 8B (llama-3-8b's config): qlora, gc on, both optimizers x seq {1024, 2048}; qlora gc off
  (paged, 1024); lora gc on (paged, 2048).

Each group runs in its own child process (a fresh CUDA context and NVML baseline; bitsandbytes' paged
buffers, which are never freed, stay in that process; a hard crash such as bitsandbytes' exit(1) on
a failed managed allocation costs one configuration, which is recorded as "oom" or "failed" from
the child's stderr, and the rest of the group continues in a new child). Within a group the model is
loaded once per (method, checkpointing) and reused across optimizers and sequence lengths. While
the tiny group runs on the GPU, a background process writes the 1B and 8B random-weight checkpoints
(CPU and disk only).

Output in --out: runs/*.json (memplan.run/1), summary.md and summary.json (estimate vs measured per
configuration), calibration.json (median measured CUDA context, workspace and allocator overhead
per GPU, for profiles/gpus/<gpu>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MemplanError
from ..plan import TrainPlan
from ..present import mib, pct
from .measure import is_oom_text
from .record import read_run, write_json_atomic

#: the tiny random model of the CUDA matrix (same shape as the CPU agreement tests)
TINY = dict(_name_or_path="tiny-random-llama", model_type="llama", hidden_size=256, intermediate_size=688,
            num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: the CPU --tiny check's model: small enough for seconds per configuration
TINY_CPU = dict(TINY, _name_or_path="tiny-random-llama-h64", hidden_size=64, intermediate_size=172, vocab_size=512,
                max_position_embeddings=512)
GROUP_MODELS: dict[str, Any] = {"tiny": TINY, "1b": "llama-3.2-1b", "8b": "llama-3-8b", "cpu-tiny": TINY_CPU}


@dataclass(frozen=True)
class Entry:
    id: str
    group: str
    plan: dict[str, Any] = field(hash=False)


def _e(group: str, method: str, gc: bool, optim: str, seq: int, **extra: Any) -> Entry:
    eid = f"{group}-{method}-{'gc' if gc else 'nogc'}-{optim}-s{seq}"
    return Entry(eid, group, dict(method=method, gradient_checkpointing=gc, optim=optim, seq_len=seq, **extra))


def cuda_matrix() -> list[Entry]:
    out = []
    for m in ("qlora", "lora"):
        for gc in (True, False):
            for o in ("paged_adamw_8bit", "adamw_torch"):
                for s in (256, 1024):
                    out.append(_e("tiny", m, gc, o, s))
    for gc in (True, False):
        for o in ("paged_adamw_8bit", "adamw_torch"):
            for s in (1024, 2048):
                out.append(_e("1b", "qlora", gc, o, s))
    for o in ("paged_adamw_8bit", "adamw_torch"):
        out.append(_e("1b", "lora", True, o, 2048))
    for o in ("paged_adamw_8bit", "adamw_torch"):
        for s in (1024, 2048):
            out.append(_e("8b", "qlora", True, o, s))
    out.append(_e("8b", "qlora", False, "paged_adamw_8bit", 1024))
    out.append(_e("8b", "lora", True, "paged_adamw_8bit", 2048))
    # run order: tiny (while the big checkpoints are written), then 8B (the most telling), then 1B
    rank = {"tiny": 0, "8b": 1, "1b": 2}
    return sorted(out, key=lambda e: rank[e.group])


def cpu_tiny_matrix() -> list[Entry]:
    """A fractional design over the same four factors, for the CPU path (seconds)."""
    g = "cpu-tiny"
    return [_e(g, "qlora", True, "paged_adamw_8bit", 64), _e(g, "qlora", False, "adamw_torch", 128),
            _e(g, "lora", True, "adamw_torch", 64), _e(g, "lora", False, "paged_adamw_8bit", 128)]


def matrix(device: str, tiny: bool) -> list[Entry]:
    if device == "cpu":
        return cpu_tiny_matrix() if tiny else [Entry(e.id.replace("tiny-", "cpu-tiny-", 1), "cpu-tiny", e.plan)
                                               for e in cuda_matrix() if e.group == "tiny"]
    return [e for e in cuda_matrix() if e.group == "tiny"] if tiny else cuda_matrix()


def entry_plan(e: Entry, device: str) -> TrainPlan:
    return TrainPlan(device=device, **e.plan)


# ---------------------------------------------------------------------------------------------
# child: run entries of one group in this process
# ---------------------------------------------------------------------------------------------
def run_child(group: str, ids: list[str], device: str, out: Path, results: Path, steps: int, deadline: float,
              tiny: bool) -> int:
    from .runner import open_session
    from .record import write_run

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    entries = {e.id: e for e in matrix(device, tiny)}
    todo = [entries[i] for i in ids]  # in the parent's order (see load_order)
    model = GROUP_MODELS[group]
    session = None
    current = [""]
    try:
        for e in todo:
            if time.time() > deadline:
                _append(results, {"id": e.id, "status": "skipped", "reason": "time budget spent"})
                continue
            plan = entry_plan(e, device)
            current[0] = e.id
            if session is None:
                session = open_session(model, plan, progress=lambda m: print(f"[{current[0]}] {m}", file=sys.stderr,
                                                                             flush=True))
            t0 = time.time()
            run = session.run(plan, steps)
            path = write_run(run, out / "runs")
            _append(results, {"id": e.id, "status": run.status, "path": str(path),
                              "seconds": round(time.time() - t0, 2)})
    finally:
        if session is not None:
            session.close()
    return 0


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def prepare_weights(groups: list[str]) -> int:
    """Write the random-weight checkpoints of `groups` (CPU and disk only); print "ready GROUP" for each."""
    from ..catalogue import load_model
    from .weights import random_checkpoint

    for g in groups:
        m = GROUP_MODELS[g]
        cfg = dict(load_model(m).config) if isinstance(m, str) else dict(m)
        random_checkpoint(cfg, "bf16")
        print(f"ready {g}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# parent: spawn the children, collect, summarise
# ---------------------------------------------------------------------------------------------
def load_order(entries: list[Entry]) -> list[Entry]:
    """One load per (method, checkpointing): plans that can reuse a loaded model run back to back."""
    return sorted(entries, key=lambda e: (e.plan["method"] != "qlora", not e.plan["gradient_checkpointing"]))


def _child_cmd(args: argparse.Namespace, group: str, ids: list[str], results: Path, deadline: float) -> list[str]:
    cmd = [sys.executable, "-m", "memplan.profile.matrix", "--child", "--group", group, "--ids", ",".join(ids),
           "--device", args.device, "--out", str(args.out), "--results", str(results), "--steps", str(args.steps),
           "--deadline", str(deadline)]
    return cmd + (["--tiny"] if args.tiny else [])


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out[row["id"]] = row
    return out


def run_group(args: argparse.Namespace, group: str, entries: list[Entry], deadline: float,
              log: Any) -> dict[str, dict[str, Any]]:
    """Run a group in child processes until every entry has a result (a crash costs one entry)."""
    results = Path(args.out) / f".results-{group}.jsonl"
    results.unlink(missing_ok=True)
    remaining = [e.id for e in entries]
    got: dict[str, dict[str, Any]] = {}
    empty_failures = 0
    while remaining:
        grace = 60.0
        timeout = max(10.0, deadline - time.time() + grace)
        log(f"group {group}: {len(remaining)} configuration(s) in a child process")
        proc = subprocess.Popen(_child_cmd(args, group, remaining, results, deadline), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        tail: list[str] = []

        def pump() -> None:  # show the child's progress live, keep its last lines for the verdict
            assert proc.stderr is not None
            for line in proc.stderr:
                tail.append(line.rstrip())
                del tail[:-40]
                if not args.quiet:
                    print(f"    {line.rstrip()}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            tail.append("[killed: time budget]")
        reader.join(timeout=5)
        err = "\n".join(tail)
        before = len(remaining)
        got.update(_read_results(results))
        remaining = [i for i in remaining if i not in got]
        empty_failures = empty_failures + 1 if len(remaining) == before and proc.returncode != 0 else 0
        if empty_failures >= 2 and not is_oom_text(err):  # it cannot even start: do not retry each one
            tail = "\n".join(err.strip().splitlines()[-15:])
            log(f"group {group}: the child fails before running anything; {len(remaining)} configuration(s) failed")
            for i in remaining:
                got[i] = {"id": i, "status": "failed", "reason": f"child exited {proc.returncode}: {tail[-600:]}"}
            break
        if proc.returncode != 0 or remaining:
            tail = "\n".join((err or "").strip().splitlines()[-15:])
            if not remaining:
                break
            first = remaining.pop(0)
            killed = "[killed: time budget]" in (err or "")
            status = "skipped" if killed else ("oom" if is_oom_text(err or "") else "failed")
            got[first] = {"id": first, "status": status, "reason": f"child exited {proc.returncode}: {tail[-600:]}"}
            log(f"group {group}: {first} -> {status} (child exited {proc.returncode})")
            if killed:
                for i in remaining:
                    got[i] = {"id": i, "status": "skipped", "reason": "time budget spent"}
                remaining = []
    results.unlink(missing_ok=True)
    return got


def _row(e: Entry, res: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": e.id, "group": e.group, "status": res.get("status"), "seconds": res.get("seconds"),
                           "reason": res.get("reason"), "path": res.get("path")}
    if res.get("path"):
        run = read_run(res["path"])
        row.update(status=run.status, model=run.model.get("name"), plan=dict(run.plan),
                   gpu=(run.gpu or {}).get("name") or (run.gpu or {}).get("nvml_name"))
        if run.failure:
            row["failure"] = dict(run.failure)
        cmp = run.estimate_error()
        if cmp:
            row["peak"] = {k: v for k, v in cmp["peak"].items()}
            row["terms"] = {t: v["error_pct"] for t, v in cmp["terms"].items()}
        if run.status == "success" and run.measured.get("terms"):
            t = run.measured["terms"]
            alloc = run.allocated_bytes or 0
            row["overheads"] = {"cuda_context_bytes": t.get("cuda_context"), "workspace_bytes": t.get("workspace"),
                                "reserve_ratio": (t.get("allocator_overhead", 0) / alloc) if alloc else None}
        row["peak_phase"] = {"measured": run.peak.get("phase"),
                             "estimate": (run.estimate or {}).get("peak", {}).get("phase")}
    return row


def _mib(n: Any) -> str:
    return mib(n, 1, na="-")


def _pct(p: Any) -> str:
    return pct(p, na="-")


def summary_markdown(rows: list[dict[str, Any]], device: str) -> str:
    keys = ("allocated_bytes", "reserved_bytes", "device_bytes") if device == "cuda" else ("allocated_bytes",)
    head = ["configuration", "status"]
    for k in keys:
        n = k.replace("_bytes", "")
        head += [f"{n} measured MiB", f"{n} estimate MiB", f"{n} error"]
    head += ["peak phase (meas/est)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["id"], r["status"] or "-"]
        for k in keys:
            c = (r.get("peak") or {}).get(k) or {}
            cells += [_mib(c.get("measured")), _mib(c.get("estimate")), _pct(c.get("error_pct"))]
        pp = r.get("peak_phase") or {}
        cells.append(f"{pp.get('measured') or '-'}/{pp.get('estimate') or '-'}")
        lines.append("| " + " | ".join(cells) + " |")
    ok = [r for r in rows if r["status"] == "success" and r.get("peak")]
    for k in keys:
        errs = sorted(abs(r["peak"][k]["error_pct"]) for r in ok if r["peak"].get(k, {}).get("error_pct") is not None)
        if errs:
            lines.append("")
            lines.append(f"{k.replace('_bytes', '')}: |error| median {statistics.median(errs):.2f}%, "
                         f"max {errs[-1]:.2f}% "
                         f"over {len(errs)} runs")
    return "\n".join(lines) + "\n"


def calibration(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median measured overheads per GPU (the estimator counts 2 cuBLAS workspaces: halve the total)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "success" and r.get("overheads") and r.get("gpu"):
            by.setdefault(r["gpu"], []).append(r["overheads"])
    out = {}
    for gpu, ovs in by.items():
        def med(key: str) -> Any:
            v = [o[key] for o in ovs if o.get(key) is not None]
            return statistics.median(v) if v else None
        ws = med("workspace_bytes")
        out[gpu] = {"runs": len(ovs), "cuda_context_bytes": med("cuda_context_bytes"),
                    "workspace_bytes": int(ws / 2) if ws is not None else None, "reserve_ratio": med("reserve_ratio"),
                    "how": "medians over the successful runs of this check; workspace_bytes is half the measured "
                           "untracked allocator bytes (the estimator counts two cuBLAS workspaces)"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="memplan.profile.matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="only the tiny model (CPU: a 4-configuration design)")
    ap.add_argument("--out", default=None, help="output folder (default gpu-check-<UTC time>)")
    ap.add_argument("--groups", default=None, help="comma-separated groups to run (tiny,1b,8b)")
    ap.add_argument("--steps", type=int, default=None, help="steps per configuration (default 3 CUDA, 2 CPU)")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="start no configuration after this many seconds; a child still running 60 s later is "
                         "stopped (default 400: the whole check stays under 8 minutes)")
    ap.add_argument("--list", action="store_true", help="print the matrix and exit")
    ap.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    ap.add_argument("--quiet", action="store_true", help="do not echo the children's progress")
    # internal
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-weights", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--group", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.device == "cuda" else 2
    if args.prepare_weights:
        return prepare_weights(args.prepare_weights.split(","))
    if args.child:
        return run_child(args.group, args.ids.split(","), args.device, Path(args.out), Path(args.results),
                         args.steps, args.deadline, args.tiny)
    entries = matrix(args.device, args.tiny)
    if args.groups:
        want = set(args.groups.split(","))
        entries = [e for e in entries if e.group in want]
    if args.list:
        for e in entries:
            print(f"{e.id:<44} {e.plan}")
        return 0
    t0 = time.time()
    args.out = Path(args.out or f"gpu-check-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    deadline = t0 + args.budget_s

    def log(msg: str) -> None:
        print(f"gpu-check [{time.time() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    groups: list[str] = []
    for e in entries:
        if e.group not in groups:
            groups.append(e.group)
    prep = None
    big = [g for g in groups if isinstance(GROUP_MODELS[g], str)]  # in run order: 8b before 1b
    if big:  # write the big random checkpoints while the first group runs
        prep = subprocess.Popen([sys.executable, "-m", "memplan.profile.matrix", "--prepare-weights", ",".join(big)],
                                stdout=subprocess.PIPE, text=True)
        log(f"writing random-weight checkpoints for {', '.join(big)} in the background")
    ready: set[str] = set()
    got: dict[str, dict[str, Any]] = {}
    for g in groups:
        if g in big and prep is not None:
            while g not in ready:
                line = prep.stdout.readline() if prep.stdout else ""
                if not line:
                    if prep.wait() != 0:
                        log("background checkpoint writer failed; the group writes its own")
                    break
                if line.startswith("ready "):
                    ready.add(line.split()[1])
                    log(f"checkpoint ready: {line.split()[1]}")
        got.update(run_group(args, g, load_order([e for e in entries if e.group == g]), deadline, log))
    if prep is not None and prep.poll() is None:
        prep.wait()
    rows = [_row(e, got.get(e.id, {"status": "skipped"})) for e in entries]
    summary = {"schema": "memplan.gpu-check/1", "device": args.device, "tiny": args.tiny,
               "seconds": round(time.time() - t0, 1), "rows": rows, "calibration": calibration(rows)}
    write_json_atomic(args.out / "summary.json", summary)
    md = summary_markdown(rows, args.device)
    (args.out / "summary.md").write_text(md, encoding="utf-8")
    if summary["calibration"]:
        write_json_atomic(args.out / "calibration.json", summary["calibration"])
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(md)
        print(f"{len(rows)} configurations in {summary['seconds']} s; run records in {args.out / 'runs'} "
              f"(copy them to profiles/runs/ to have the tests check the estimator against them)")
        for gpu, c in summary["calibration"].items():
            print(f"calibration for profiles/gpus/{gpu}.json overheads: {json.dumps(c)}")
    skipped = [r["id"] for r in rows if r["status"] == "skipped"]
    if skipped:
        print(f"{len(skipped)} configuration(s) skipped (time budget): {', '.join(skipped)}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":  # pragma: no cover
    try:
        raise SystemExit(main())
    except MemplanError as e:
        print(f"memplan: error: {e}", file=sys.stderr)
        raise SystemExit(2)
