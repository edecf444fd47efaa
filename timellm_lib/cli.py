"""The ``timellm`` command: train, inspect, eval, predict, trace, plot and batch runs.

Bad input (any :class:`WorkbenchError`) is printed as one paragraph naming the problem and the
fix, with exit code 2 and no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from timellm_lib.config import load_config
from timellm_lib.errors import WorkbenchError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults fill the rest)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.lr=5e-4 (repeatable)",
    )


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timellm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_checkpoint_commands(sub)
    _add_notebook_commands(sub)
    _add_data(sub)
    p = sub.add_parser("trace", help="stage-by-stage tensor shapes of the model")
    _add_config_args(p)
    p.add_argument(
        "--checkpoint",
        help="trace this checkpoint's trained model on real windows of --split, with the "
        "checkpoint's own config",
    )
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    return parser


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train or resume a run")
    _add_config_args(p)
    p.add_argument("--run-dir", help="run directory (default outputs/<experiment>/<run_id>)")
    p.add_argument(
        "--resume",
        help="auto (newest valid checkpoint, or a fresh start) | last (newest step checkpoint) "
        "| best (best.pt's resumable companion) | PATH to a checkpoint",
    )
    p.add_argument("--max-steps", type=int, help="stop (after a checkpoint) at this global_step")
    p.add_argument("--resume-new-lr", action="store_true", help="keep moments, use config lr")
    p.add_argument("--resume-reset-scheduler", action="store_true", help="rebuild the scheduler")
    p.add_argument("--resume-counter", type=int, help="override the EarlyStopping counter")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="K",
        help="train with K processes on this machine (DDP launched through torchrun: one per "
        "GPU, or K CPU processes); data.batch_size is the global batch, split across them",
    )


def _add_checkpoint_commands(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's fields, sizes and digests")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="score a checkpoint on val or test, per step and channel")
    _add_checkpoint_args(p)
    p.add_argument("--split", default="test", choices=["val", "test"], help="(test)")
    p.add_argument(
        "--whole-split",
        action="store_true",
        help="val: every window, also where the run validated on a data.val_subset (written "
        "as eval_val_all*.json)",
    )
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per forward")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("predict", help="forecast the test split or a user CSV to .csv/.npz")
    _add_checkpoint_args(p)
    p.add_argument(
        "--input",
        metavar="CSV",
        help="forecast what follows the last seq_len rows of this CSV (default: every window "
        "of the test split, with the truth)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="predictions .csv or .npz")


def _add_notebook_commands(sub: Any) -> None:
    p = sub.add_parser("plot", help="loss curves of runs to a PNG and a long-format CSV")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument(
        "--smooth", type=int, default=1, metavar="N", help="moving average of train loss"
    )
    p.add_argument("--out-png", default="loss_curves.png", metavar="FILE", help="figure (PNG)")
    p.add_argument("--out-csv", default="loss_curves.csv", metavar="FILE", help="long-format CSV")
    p.add_argument("--title", metavar="TEXT", help="figure title")

    p = sub.add_parser("batch", help="papermill runs of notebooks from a YAML plan")
    p.add_argument("plan", help="YAML plan of notebook runs (see timellm_lib/notebooks/batch.py)")
    p.add_argument("--cwd", metavar="DIR", help="where notebooks run (default: plan's cwd, else .)")
    p.add_argument("--summary-csv", metavar="FILE", help="also write the summary table as CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("study", help="train a YAML plan of experiments over seeds: a results table")
    p.add_argument(
        "plan", help="YAML study plan (configs/studies/, see timellm_lib/notebooks/study.py)"
    )
    p.add_argument("--out", metavar="DIR", help="study folder (default outputs/studies/<name>)")
    p.add_argument("--rows", nargs="+", metavar="NAME", help="train only these rows")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override for every row, e.g. --set data.path=FILE (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_data(sub: Any) -> None:
    p = sub.add_parser("data", help="get data sets: timellm data download ETTh1 [ETTh2 ...]")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("download", help="fetch ETT files from the ETDataset repository")
    p.add_argument("names", nargs="+", metavar="NAME", help="ETTh1 ETTh2 ETTm1 ETTm2")
    p.add_argument("--dir", default="data/ETT-small", help="target folder (data/ETT-small)")
    p.add_argument(
        "--base-url",
        help="where the files are (default $TIMELLM_ETT_BASE_URL, else the ETDataset "
        "repository's raw ETT-small folder)",
    )
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="also fetch files without a pinned sha256 (their sha256 is printed)",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    """Train or resume. Resuming without --config starts from the resumed run's own
    config.yaml (that of --run-dir, else that of the checkpoint's run directory), so
    ``timellm train --run-dir DIR --resume auto`` is enough; --set still applies on top, for
    the keys a resume may change.

    ``--nproc K`` relaunches this command as K torchrun processes. Under torchrun (RANK set)
    only rank 0 prints: the trainer raises the same error on every rank, so the others exit 2
    quietly (all of them print with --debug)."""
    from pathlib import Path

    from timellm_lib.training import train

    rank = int(os.environ.get("RANK", "0"))
    _show_training_messages(quiet=rank > 0 and not args.debug)
    if args.nproc is not None:
        if args.nproc < 1:
            raise WorkbenchError(f"--nproc {args.nproc} must be at least 1")
        if "RANK" in os.environ:
            raise WorkbenchError(
                "--nproc launches torchrun itself; under torchrun leave it out (torchrun's "
                "--nproc-per-node sets the number of processes)"
            )
        if args.nproc > 1:
            from timellm_lib.training.distributed import launch

            return launch(args.nproc, _torchrun_worker_args(args))
    config = args.config
    if config is None and args.resume:
        candidates = [Path(args.run_dir) / "config.yaml"] if args.run_dir else []
        if args.resume not in ("auto", "last", "best"):  # a checkpoint path: its run's config
            candidates.append(Path(args.resume).resolve().parent.parent / "config.yaml")
        config = next((c for c in candidates if c.is_file()), None)
    try:
        cfg = load_config(config, args.overrides)
        result = train(
            cfg,
            run_dir=args.run_dir,
            resume=args.resume,
            max_steps=args.max_steps,
            resume_new_lr=args.resume_new_lr,
            resume_reset_scheduler=args.resume_reset_scheduler,
            resume_counter=args.resume_counter,
            progress=not args.no_progress,
        )
    except WorkbenchError:
        if rank > 0 and not args.debug:
            return 2  # rank 0 prints the same message
        raise
    if rank == 0:
        print(result.summary())
    return 0


def _torchrun_worker_args(args: argparse.Namespace) -> list[str]:
    """This train command's arguments for the torchrun workers: all of them but --nproc."""
    argv = ["--debug"] if args.debug else []
    argv.append("train")
    if args.config:
        argv += ["--config", args.config]
    for item in args.overrides:
        argv += ["--set", item]
    options = {
        "--run-dir": args.run_dir,
        "--resume": args.resume,
        "--max-steps": args.max_steps,
        "--resume-counter": args.resume_counter,
    }
    argv += [a for flag, value in options.items() if value is not None for a in (flag, str(value))]
    flags = {
        "--resume-new-lr": args.resume_new_lr,
        "--resume-reset-scheduler": args.resume_reset_scheduler,
        "--no-progress": args.no_progress,
    }
    return argv + [flag for flag, on in flags.items() if on]


def _show_training_messages(quiet: bool = False) -> None:
    """Send the package's notices (resumed from, skipped a damaged file, a speed path the
    backbone cannot give) to stderr; ``quiet`` (ranks above 0 of a distributed run) keeps only
    errors."""
    import logging

    logger = logging.getLogger("timellm_lib")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("timellm train: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.ERROR if quiet else logging.INFO)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from timellm_lib.notebooks.describe import describe_checkpoint, format_description

    info = describe_checkpoint(args.checkpoint)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from timellm_lib.notebooks.tracing import format_trace, trace_checkpoint, trace_shapes

    if args.checkpoint:
        if args.config or args.overrides:
            raise WorkbenchError(
                "--checkpoint traces the model with the config stored in the checkpoint; "
                "drop --config/--set, or trace a config without --checkpoint"
            )
        rows = trace_checkpoint(args.checkpoint, args.batch_size, args.split)
    else:
        rows = trace_shapes(load_config(args.config, args.overrides), batch_size=args.batch_size)
    print(json.dumps(rows, indent=2) if args.json else format_trace(rows))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from timellm_lib.evaluation.inference import run_eval

    return run_eval(args)


def _cmd_predict(args: argparse.Namespace) -> int:
    from timellm_lib.evaluation.inference import run_predict

    return run_predict(args)


def _cmd_plot(args: argparse.Namespace) -> int:
    from timellm_lib.notebooks.plots import run_plot

    return run_plot(args)


def _cmd_study(args: argparse.Namespace) -> int:
    from timellm_lib.notebooks.study import run_study_command

    _show_training_messages()
    return run_study_command(args)


def _cmd_data(args: argparse.Namespace) -> int:
    from timellm_lib.data.download import run_data_command

    return run_data_command(args)


def _cmd_batch(args: argparse.Namespace) -> int:
    from timellm_lib.notebooks.batch import run_batch

    return run_batch(args)


COMMANDS = {
    "train": _cmd_train,
    "inspect": _cmd_inspect,
    "trace": _cmd_trace,
    "eval": _cmd_eval,
    "predict": _cmd_predict,
    "plot": _cmd_plot,
    "batch": _cmd_batch,
    "study": _cmd_study,
    "data": _cmd_data,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed, for records such as a study's results
    try:
        return COMMANDS[args.command](args)
    except WorkbenchError as err:
        if args.debug:
            raise
        message = textwrap.fill(str(err), width=100, break_on_hyphens=False, break_long_words=False)
        print(f"timellm {args.command}: error: {message}", file=sys.stderr)
        return 2


def _exit(code: int) -> None:
    """End the process. A torchrun worker skips C++ static destructors: at interpreter exit,
    gloo's and the rendezvous store's threads can abort a worker whose peer closed its
    connections first ("terminate called without an active exception", exit -6) although the
    run is complete; by now every rank has passed the final barrier and every file is durable."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
