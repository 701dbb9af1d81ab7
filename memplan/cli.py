"""The `memplan` command line. Each command is a parser, a data function (the Python API) and a printer.

Every MemplanError and every usage error becomes one `memplan: error: <message>` on stderr and exit
status 2; `fit` exits 1 when the plan does not fit. Heavy modules load only inside `simulate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .catalogue import list_gpus, list_models, load_model
from .errors import MemplanError
from .estimate import Estimate, estimate
from .fit import Fit, check_fit
from .optim import OPTIMIZERS
from .plan import ATTN, DEVICES, DTYPES, METHODS, MIXED, QUANTS, TrainPlan, plan_from
from .terms import Term
from .units import GiB

EXIT_OK, EXIT_NO_FIT, EXIT_BAD_INPUT = 0, 1, 2
SIM_MISSING = "simulate needs torch, transformers, peft and bitsandbytes: pip install 'memplan[sim]'"


class _UsageError(Exception):
    """An argparse error, turned into `memplan: error: ...` by main()."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never print usage + exit from inside argparse
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# plan flags (DESIGN.md, "The plan")
# ---------------------------------------------------------------------------------------------
_D = TrainPlan()  # the resolved defaults, shown in --help


def _positive_int(text: str) -> int:
    # NB: 0 and negatives parse here so that TrainPlan reports them together with other problems.
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """Flags for every TrainPlan field; each defaults to None so an unset flag keeps TrainPlan's default."""
    g = p.add_argument_group("plan (defaults: today's common HF QLoRA recipe)")
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument("--method", choices=METHODS, help=f"training method (default {_D.method})")
    g.add_argument("--quant", choices=QUANTS, help="base weight quantization (default nf4 for qlora, none otherwise)")
    g.add_argument("--double-quant", action=bool_flag, default=None,
                   help="bitsandbytes nested quantization of the absmax constants (default on)")
    g.add_argument("--compute-dtype", choices=DTYPES, help=f"bnb_4bit_compute_dtype (default {_D.compute_dtype})")
    g.add_argument("--dtype", choices=DTYPES, help=f"load dtype of unquantized weights (default {_D.dtype})")
    g.add_argument("--prepare", action=bool_flag, default=None,
                   help="run prepare_model_for_kbit_training; --no-prepare skips it (default on for qlora)")
    g.add_argument("--lora-r", type=_positive_int, metavar="R", help=f"LoRA rank (default {_D.lora_r})")
    g.add_argument("--lora-alpha", type=_positive_int, metavar="A", help=f"LoRA alpha (default {_D.lora_alpha})")
    g.add_argument("--lora-dropout", type=float, metavar="P", help=f"LoRA dropout (default {_D.lora_dropout})")
    g.add_argument("--target-modules", metavar="MODS",
                   help="LoRA targets: all-linear (peft: every Linear but the output layer) or a comma-separated "
                        "list like q_proj,v_proj (default all-linear)")
    g.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help=f"per-device micro-batch size (default {_D.batch_size})")
    g.add_argument("--seq-len", type=_positive_int, metavar="N", help=f"tokens per sequence (default {_D.seq_len})")
    g.add_argument("--gradient-accumulation-steps", type=_positive_int, metavar="N",
                   help=f"micro-batches per optimizer step (default {_D.gradient_accumulation_steps})")
    g.add_argument("--gradient-checkpointing", action=bool_flag, default=None,
                   help="non-reentrant activation checkpointing, as the HF Trainer sets it (default on)")
    g.add_argument("--optim", metavar="NAME",
                   help=f"HF TrainingArguments.optim name (default {_D.optim}); one of: {', '.join(OPTIMIZERS)}")
    g.add_argument("--attn-implementation", choices=ATTN,
                   help=f"attention kernel (default {_D.attn_implementation})")
    g.add_argument("--mixed-precision", choices=MIXED,
                   help=f"HF Trainer autocast: bf16=True, fp16=True, or no (default {_D.mixed_precision})")
    g.add_argument("--device", choices=DEVICES, help=f"device the step runs on (default {_D.device})")


def plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the plan flags the user gave (unset ones keep TrainPlan's defaults)."""
    return {k: getattr(args, k) for k in TrainPlan.field_names() if getattr(args, k, None) is not None}


def plan_from_args(args: argparse.Namespace) -> TrainPlan:
    return plan_from(**plan_kwargs(args))


# ---------------------------------------------------------------------------------------------
# data functions (thin wrappers over the API, so tests can call them)
# ---------------------------------------------------------------------------------------------
def estimate_data(args: argparse.Namespace) -> Estimate:
    return estimate(args.model, gpu=args.gpu, **plan_kwargs(args))


def fit_data(args: argparse.Namespace) -> Fit:
    if args.reserve is not None and args.reserve < 0:
        raise MemplanError(f"--reserve must be >= 0 GiB, got {args.reserve}")
    return check_fit(args.model, args.gpu, reserve_bytes=int(round((args.reserve or 0) * GiB)),
                     **plan_kwargs(args))


def models_data() -> list[dict[str, Any]]:
    return [{"name": m.name, "hub_id": m.hub_id, "aliases": list(m.aliases), "architecture": m.architecture,
             "model_type": m.model_type, "params": m.params, "num_layers": m.num_layers,
             "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
             "max_position_embeddings": m.max_position_embeddings}
            for m in list_models()]


def gpus_data() -> list[dict[str, Any]]:
    return [{"name": g.name, "full_name": g.full_name, "aliases": list(g.aliases), "memory_bytes": g.memory_bytes,
             "compute_capability": g.compute_capability, "bf16": g.bf16}
            for g in list_gpus()]


def simulate_data(args: argparse.Namespace) -> dict[str, Any]:
    """Run the meta-device trace; returns the estimate-shaped dict with schema memplan.simulate/1."""
    spec = load_model(args.model)
    plan = plan_from_args(args)
    try:
        from .simulate import simulate
    except ImportError:
        raise MemplanError(SIM_MISSING) from None
    res = simulate(dict(spec.config), plan)
    terms = {str(t): 0 for t in Term}
    terms.update({str(k): int(v) for k, v in res.terms.items()})
    return {
        "schema": "memplan.simulate/1",
        "model": spec.to_dict(),
        "plan": plan.to_dict(),
        "device": plan.device,
        "gpu": None,
        "terms": terms,
        "peak": {"phase": res.peak_phase, "allocated_bytes": int(res.peak_bytes),
                 "reserved_bytes": None, "device_bytes": None},
        "phase_peaks": {str(k): int(v) for k, v in res.phase_peaks.items()},
        "paged_bytes": int(getattr(res, "paged_bytes", 0) or 0),
        "fits": None,
        "headroom_bytes": None,
        "notes": ["simulate traces logical bytes of a real step on the meta device; "
                  "allocator overhead, workspace and CUDA context are not traced"],
    }


# ---------------------------------------------------------------------------------------------
# printers
# ---------------------------------------------------------------------------------------------
def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def plan_lines(plan: TrainPlan) -> list[str]:
    """The plan assumed, in two lines."""
    if plan.method == "full":
        head = "full fine-tune"
    else:
        base = (f"{plan.quant}{' + double quant' if plan.double_quant and plan.quant in ('nf4', 'fp4') else ''} base"
                if plan.quant != "none" else f"{plan.dtype} base")
        tm = plan.target_modules if isinstance(plan.target_modules, str) else ",".join(plan.target_modules)
        head = (f"{plan.method}: {base}, LoRA r={plan.lora_r} alpha={plan.lora_alpha} "
                f"dropout={plan.lora_dropout} on {tm}")
    head += (f"; compute {plan.compute_dtype}, load {plan.dtype}"
             f"{', prepare_model_for_kbit_training' if plan.prepare else ''}")
    run = (f"batch {plan.batch_size} x seq {plan.seq_len}, grad accum {plan.gradient_accumulation_steps}, "
           f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}, {plan.optim}, "
           f"{plan.attn_implementation}, mixed precision {plan.mixed_precision}, {plan.device}")
    return [head, run]


def _table(d: dict[str, Any], out: Callable[[str], None], reserve_bytes: int = 0) -> None:
    terms, peak = d["terms"], d["peak"]
    gpu = d.get("gpu")
    m = d["model"]
    where = f" on {gpu['name']} ({_gib(gpu['memory_bytes'])} GiB)" if gpu else ""
    out(f"{m['name']} ({m['architecture']}, {m['params'] / 1e9:.2f} B params){where}")
    out("plan: " + "\n      ".join(plan_lines(_plan_obj(d["plan"]))))
    out("")
    total = peak["device_bytes"] or peak["allocated_bytes"] or 1
    out(f"{'term':<20} {'GiB':>9} {'share':>7}")
    for name, v in terms.items():
        out(f"{name:<20} {_gib(v):>9} {100 * v / total:>6.1f}%")
    out("-" * 38)
    out(f"peak phase: {peak['phase']}")
    of = f" of {_gib(gpu['memory_bytes'])} GiB" if gpu else ""
    for label, key in (("allocated", "allocated_bytes"), ("reserved", "reserved_bytes"), ("device", "device_bytes")):
        if peak.get(key) is not None:
            pct = f" ({100 * peak[key] / gpu['memory_bytes']:.1f}%)" if gpu else ""
            out(f"{label:<20} {_gib(peak[key]):>9} GiB{of}{pct}")
    if reserve_bytes:
        out(f"{'reserve kept free':<20} {_gib(reserve_bytes):>9} GiB")
    if d.get("headroom_bytes") is not None:
        verdict = "fits" if d["fits"] else "DOES NOT FIT"
        out(f"{'headroom':<20} {_gib(d['headroom_bytes']):>9} GiB  -> {verdict}")
    if d.get("paged_bytes"):
        out(f"{'paged (managed mem)':<20} {_gib(d['paged_bytes']):>9} GiB  paged optimizer state, outside the allocator")
    if d.get("notes"):
        out("notes:")
        for n in d["notes"]:
            out(f"  - {n}")


def _plan_obj(d: dict[str, Any]) -> TrainPlan:
    return TrainPlan(**{**d, "target_modules": d["target_modules"] if isinstance(d["target_modules"], str)
                        else tuple(d["target_modules"])})


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def cmd_estimate(args: argparse.Namespace) -> int:
    d = estimate_data(args).to_dict()
    _print_json(d) if args.json else _table(d, print)
    return EXIT_OK


def cmd_fit(args: argparse.Namespace) -> int:
    f = fit_data(args)
    d = f.to_dict()
    _print_json(d) if args.json else _table(d, print, reserve_bytes=f.reserve_bytes)
    return EXIT_OK if f.fits else EXIT_NO_FIT


def cmd_simulate(args: argparse.Namespace) -> int:
    d = simulate_data(args)
    _print_json(d) if args.json else _table(d, print)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    rows = models_data()
    if args.json:
        _print_json({"schema": "memplan.models/1", "models": rows})
        return EXIT_OK
    print(f"{'name':<24} {'params':>8} {'layers':>6} {'hidden':>6} {'vocab':>7}  hub id")
    for r in rows:
        print(f"{r['name']:<24} {r['params'] / 1e9:>7.2f}B {r['num_layers']:>6} {r['hidden_size']:>6} "
              f"{r['vocab_size']:>7}  {r['hub_id']}")
    return EXIT_OK


def cmd_gpus(args: argparse.Namespace) -> int:
    rows = gpus_data()
    if args.json:
        _print_json({"schema": "memplan.gpus/1", "gpus": rows})
        return EXIT_OK
    print(f"{'name':<16} {'GiB':>7} {'cc':>5} {'bf16':>5}  full name")
    for r in rows:
        print(f"{r['name']:<16} {_gib(r['memory_bytes']):>7} {r['compute_capability']:>5} "
              f"{'yes' if r['bf16'] else 'no':>5}  {r['full_name']}")
    return EXIT_OK


MODEL_HELP = ("catalogue name or alias (see `memplan models`), Hugging Face repo id, "
              "or a path to a directory or config.json")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memplan",
        description="GPU memory for QLoRA/LoRA fine-tuning: where every byte of a training step goes, "
                    "and whether it fits.",
        epilog="Run `memplan COMMAND --help` for the plan flags. Exit status: 0 ok (fit: fits), "
               "1 does not fit, 2 bad input.")
    parser.add_argument("--version", action="version", version=f"memplan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help_: str, *, model: bool = True,
                plan: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if model:
            p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
        if plan:
            add_plan_flags(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(func=func)
        return p

    p = command("estimate", cmd_estimate, "per-term breakdown of the peak memory of one training step")
    p.add_argument("--gpu", metavar="GPU", help="GPU name for overheads and fit (see `memplan gpus`)")
    p = command("fit", cmd_fit, "does it fit? exit 0 fits, 1 does not fit, 2 bad input")
    p.add_argument("--gpu", metavar="GPU", required=True, help="GPU name (see `memplan gpus`)")
    p.add_argument("--reserve", metavar="GiB", type=float, default=None,
                   help="GiB to keep free for other processes or as a margin (default 0)")
    command("simulate", cmd_simulate,
            "exact meta-device trace of a real training step (needs the sim extra: torch, transformers, "
            "peft, bitsandbytes)")
    command("models", cmd_models, "list the bundled model catalogue", model=False, plan=False)
    command("gpus", cmd_gpus, "list the bundled GPU catalogue", model=False, plan=False)
    return parser


def _error(message: str) -> int:
    print(f"memplan: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            return _error("give a command: estimate, fit, simulate, models or gpus (see `memplan --help`)")
        return args.func(args)
    except _UsageError as e:
        return _error(str(e))
    except MemplanError as e:
        return _error(str(e))
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `memplan models | head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
