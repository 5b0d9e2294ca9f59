#!/usr/bin/env python
"""eir's one command line: prepare data, run experiments (more subcommands land with their issues).

Experiment settings live in YAML files under experiments/ with key=value overrides; this file
only parses arguments and calls the library.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import textwrap
import traceback
from pathlib import Path

from eir import storage
from eir.bench import BENCHMARKS
from eir.config import ConfigError, describe_keys, load_config
from eir.data.base import DatasetError
from eir.data.prepare import prepare_split
from eir.data.registry import DATASETS
from eir.data.synthetic import generate_synthetic
from eir.model import CheckpointError
from eir.raysession import VERBOSE_ENV, RayStartError
from eir.report import write_report
from eir.submit import add_submit_parser
from eir.tasks import TaskError
from eir.train import cache
from eir.train.evaluate_run import evaluate_run
from eir.train.experiment import run_experiment
from eir.train.preview import write_preview
from eir.train.pseudo_quality import quality_table, score_pseudo_labels
from eir.train.rundir import RunDirError
from eir.train.sweep import dry_run_sweep, run_sweep
from eir.visualize import pseudo_quality_figure

log = logging.getLogger("eir")
# Bad input: one `error:` line and exit 2 (OSError and RayStartError too, see `main`).
USER_ERRORS = (ConfigError, DatasetError, TaskError, RunDirError, CheckpointError, FileExistsError)


def _cmd_prepare(args: argparse.Namespace) -> int:
    out = storage.resolve(args.out)
    if args.dataset != "synthetic":
        if not args.root:
            raise DatasetError(f"--root is required for dataset {args.dataset!r} (the raw dataset folder)")
        _prepare_splits(args, Path(args.root), [args.split], out)
        return 0
    # The generator writes files: OUT/raw/ beside the prepared splits, or a scratch folder when OUT is
    # an object store (a cluster smoke test's data, prepared once onto the storage every node reads).
    with contextlib.ExitStack() as scratch:
        raw = Path(out.path) / "raw" if out.is_local else Path(scratch.enter_context(tempfile.TemporaryDirectory()))
        try:
            generate_synthetic(
                raw, args.num_images, seed=args.seed, image_size=args.image_size, overwrite=args.overwrite
            )
        except ValueError as exc:  # bad generator arguments: a user error, not a crash
            raise DatasetError(f"prepare synthetic: {exc}") from exc
        _prepare_splits(args, raw, ["train", "val"], out)
    return 0


def _prepare_splits(args: argparse.Namespace, root: Path, splits: list[str], out: storage.Location) -> None:
    for split in splits:
        manifest = prepare_split(
            args.dataset, root, split, out.join(split), image_scale=args.image_scale, overwrite=args.overwrite
        )
        print(
            f"{manifest.location.uri}: {manifest.num_rows} rows, {len(manifest.shards)} shards, checksum "
            f"{manifest.checksum[:16]}"
        )


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    document = run_experiment(config, resume=args.resume, dry_run=args.dry_run)
    if not args.dry_run:
        run_dir = storage.resolve(config.run.output_dir).join(config.run.name)
        print(f"results: {run_dir.join('results.json').uri}")
    return 0 if document["status"] in ("finished", "dry_run") else 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    document = evaluate_run(
        args.run_dir,
        dataset=args.dataset,
        root=args.root,
        split=args.split,
        step=args.step,
        out=args.out,
        protocol=args.protocol,
    )
    step = document["steps"][0]
    print(
        f"step {step['step']} on {args.dataset}/{args.split}: mIoU all {step['mIoU_all']}, old {step['mIoU_old']}, "
        f"new {step['mIoU_new']}, hIoU {step['hIoU']}"
    )
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    print(f"wrote {write_preview(args.run_dir, args.step, args.out, args.count)}")
    return 0


def _cmd_pseudo_labels(args: argparse.Namespace) -> int:
    documents = [score_pseudo_labels(run_dir) for run_dir in args.run_dirs]
    if args.out:
        storage.write_json_atomic(
            storage.resolve(args.out), documents[0] if len(documents) == 1 else {"runs": documents}
        )
    if args.plot:
        pseudo_quality_figure(documents, args.plot)
        print(f"wrote {args.plot}")
    for document in documents:
        print(f"pseudo-labels of {document['run']} ({document['rule_label']}) against the complete training labels, %")
        print(quality_table(document))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.dry_run:
        dry_run_sweep(args.sweep, args.overrides)
        return 0
    summary = run_sweep(args.sweep, args.overrides, resume=args.resume)
    return 0 if summary["trials"] else 1


def _cmd_report(args: argparse.Namespace) -> int:
    for path in write_report(args.dirs, args.out):
        print(f"wrote {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    methods = args.methods.split(",") if args.methods else None
    BENCHMARKS[args.name](
        quick=args.quick, overrides=args.overrides, limit=args.limit, methods=methods, rerun=args.rerun
    )
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    root = storage.resolve(args.output_dir)
    if args.clear:
        print(f"removed {cache.clear(root)} step-0 cache entries under {root.uri}")
        return 0
    entries = cache.list_entries(root)
    if not entries:
        print(f"no step-0 cache entries under {root.uri}")
    for entry in entries:
        state = entry.pop("state")
        print(f"{entry.pop('hash')}  {state}  " + "  ".join(f"{k}={v}" for k, v in entry.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="eir: continual semantic segmentation with Enhanced Instance Replay, on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              python launch.py run experiments/quickstart.yaml
              python launch.py run experiments/camvid_5-3.yaml dataset.root=/data/CamVid method.name=joint
              python launch.py prepare synthetic --num-images 600 --seed 0 --out data/synthetic
              python launch.py prepare camvid --root /data/CamVid --split train --out data/camvid --image-scale 0.5
            """
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and Ray's own logs on the console (also EIR_VERBOSE=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = sub.add_parser(
        "prepare",
        help="ingest a dataset split into Parquet shards (or generate the synthetic dataset)",
        description=textwrap.dedent(
            """\
            Ingest a dataset split into Parquet shards under OUT/<split>/ (image bytes, label PNG, instance PNG,
            classes present with pixel counts) with a manifest holding the row count and a content checksum.
            Idempotent (an unchanged source is skipped), atomic (temp folder + rename), and it refuses to replace
            a different existing output unless --overwrite. `synthetic` generates a VOC-layout dataset into
            OUT/raw/ first and prepares both its train and val splits. Other commands do this implicitly when
            dataset.root names a raw dataset folder."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("dataset", choices=DATASETS)
    prep.add_argument(
        "--root", help="raw dataset folder (VOC2012/, ADEChallengeData2016/, CamVid/, or a folder with images/ masks/)"
    )
    prep.add_argument("--split", default="train", help="split to ingest (train, val, train_aug, ...; default train)")
    prep.add_argument(
        "--out", required=True, help="output folder (a local path or a pyarrow URI); the split goes to OUT/<split>/"
    )
    prep.add_argument(
        "--image-scale", type=float, default=1.0, help="resize images and labels at ingest (0.5 = half size)"
    )
    prep.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing, different prepared output (synthetic: and a different OUT/raw/)",
    )
    prep.add_argument("--num-images", type=int, default=600, help="synthetic: number of images (train + val)")
    prep.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    prep.add_argument("--image-size", type=int, default=112, help="synthetic: image side in pixels")
    prep.set_defaults(func=_cmd_prepare)

    run = sub.add_parser(
        "run",
        help="run an experiment: steps 0..T on Ray Train, evaluated after every step, logged to MLflow",
        description=textwrap.dedent(
            """\
            Run every step of a continual task from a YAML config (experiments/*.yaml) with key=value overrides.
            Writes <run.output_dir>/<run.name>/ (config.yaml, step_<t>/ with model.pt and metrics, results.json)
            and logs a parent MLflow run with one child per step. A finished step is never trained twice:
            --resume continues an interrupted run; step 0 comes from the step-0 cache when settings agree."""
        ),
        epilog="config keys (defaults):\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 method.name=joint")
    run.add_argument("--resume", action="store_true", help="continue an existing run directory (same config)")
    run.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and the step table, train nothing"
    )
    run.set_defaults(func=_cmd_run)

    ev = sub.add_parser(
        "evaluate",
        help="score a run's checkpoint on any dataset split (same schema as results.json)",
        description="Score the model of step --step (default: the last finished step) of RUN_DIR on a dataset split, "
        "with the run's own task, class order and evaluation protocol (override with --protocol).",
    )
    ev.add_argument("run_dir", help="a run directory <run.output_dir>/<run.name>")
    ev.add_argument("--dataset", required=True, choices=DATASETS)
    ev.add_argument("--root", required=True, help="raw dataset folder or a prepared dataset folder")
    ev.add_argument("--split", required=True, help="split to score, e.g. val or test")
    ev.add_argument("--step", type=int, default=None, help="step whose model to score (default: last)")
    ev.add_argument("--protocol", choices=["full", "center_crop"], default=None, help="override eval.protocol")
    ev.add_argument("--out", default=None, help="write the results JSON here (default: print only)")
    ev.set_defaults(func=_cmd_evaluate)

    preview = sub.add_parser(
        "preview",
        help="draw the pasted training samples EIR builds at a step of an existing run",
        description="Draw a grid of step STEP's training samples as the data workers build them (training image, "
        "blended target, pseudo-label), from the run's step STEP-1 model and instance store.",
    )
    preview.add_argument("run_dir", help="a run directory <run.output_dir>/<run.name>")
    preview.add_argument("--step", type=int, required=True, help="an incremental step (>= 1)")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--count", type=int, default=8, help="number of samples (default 8)")
    preview.set_defaults(func=_cmd_preview)

    pseudo = sub.add_parser(
        "pseudo-labels",
        help="score a run's stored pseudo-labels against the complete training labels (recall/precision per old class)",
        description="For each incremental step of RUN_DIR with stored pseudo-labels (eir, eir_no_rskd, plop), count "
        "how many old-class pixels of the step's training images the pseudo-labels recover (recall) and how many of "
        "the pixels they claim are right (precision), overall and per old class, with each class's threshold under a "
        "per-class rule and the share of its pixels pseudo-labelled as another old class (and which). Several "
        "RUN_DIRs (e.g. the same run under pseudo.rule=score and score_quantile) are scored "
        "and plotted side by side. An oracle diagnostic: it uses the dataset's complete labels, which training never "
        "sees; meaningful where those are complete (overlapped CamVid, VOC, ADE).",
    )
    pseudo.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run directories <run.output_dir>/<run.name>")
    pseudo.add_argument(
        "--out", default=None, help='also write the numbers as JSON here (several runs: {"runs": [...]})'
    )
    pseudo.add_argument(
        "--plot", default=None, help="also draw each old class's recall and precision per step, a column per run"
    )
    pseudo.set_defaults(func=_cmd_pseudo_labels)

    sweep = sub.add_parser(
        "sweep",
        help="sweep experiment knobs with Ray Tune (one trial = one whole multi-step run), logged to MLflow",
        description=textwrap.dedent(
            """\
            Run a sweep file (experiments/sweeps/*.yaml: name, base, overrides, space, num_samples, metric, mode,
            scheduler, max_concurrent_trials). Each trial runs the whole experiment and reports after every step,
            so ASHA can stop poor trials early. Trials share the step-0 cache. Results: <run.output_dir>/sweeps/<name>/
            (summary.json, runs/<trial>/results.json); MLflow: experiment eir-sweep-<name>, a parent run with a nested
            run per trial and per step — select the trial runs and press Compare in the MLflow UI. Trials are named
            by their swept values (memory.size=25). Every trial's settings are checked before Ray starts."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("sweep", help="sweep YAML, e.g. experiments/sweeps/camvid_memory.yaml")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="check every trial, print the step table and which trials train or reuse a step 0; train nothing",
    )
    sweep.set_defaults(func=_cmd_sweep)

    report = sub.add_parser(
        "report",
        help="Markdown tables and PNG plots from run dirs, sweep dirs, or folders of them",
        description="Collect every finished results.json under DIR... and write report.md (final and per-step "
        "mIoU all/old/new/hIoU, mean ± std over seeds) and PNG plots (mIoU per step per method; for sweeps, the "
        "metric against each knob) to --out. A sweep over method.name and seed also gets its method table (step 0, "
        "final all/old/new/hIoU, mean over steps; mean ± sample std and n per cell, from the trials finished so "
        "far) in report.md, as <sweep>_method_table.csv/.json, and its per-step plot. For sweeps the files are "
        "also attached to the sweep's MLflow run.",
    )
    report.add_argument("dirs", nargs="+", help="run directories, sweep directories, or folders holding them")
    report.add_argument("--out", default="report", help="output folder (default ./report)")
    report.set_defaults(func=_cmd_report)

    add_submit_parser(sub)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark and write experiments/benchmarks/results/NAME.json (+ plots)",
        description="Run a benchmark, print its table and write experiments/benchmarks/results/NAME.json with the "
        "machine, versions, git SHA, date, config and raw numbers, plus PNG plots beside it. Long benchmarks skip runs "
        "already recorded, so rerunning continues an interrupted one. See BENCHMARKS.md.",
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    bench.add_argument(
        "--quick", action="store_true", help="a smaller version (performance benchmarks): NAME.quick.json"
    )
    bench.add_argument(
        "--limit", type=int, default=None, help="accuracy benchmarks: train at most N runs now (rerun to continue)"
    )
    bench.add_argument(
        "--methods",
        default=None,
        help="accuracy benchmarks: only these methods now, comma-separated (e.g. mib,plop,dkd,dkd_m)",
    )
    bench.add_argument(
        "--rerun",
        action="store_true",
        help="accuracy benchmarks, with --methods, after changing those methods: move their recorded rows to "
        "'superseded' and train them again in new run dirs (continue an interrupted rerun without --rerun)",
    )
    bench.set_defaults(func=_cmd_bench)

    cache_cmd = sub.add_parser(
        "cache", help="list or clear the step-0 cache", description="Manage <run.output_dir>/cache/step0/."
    )
    cache_cmd.add_argument(
        "--output-dir", default="outputs", help="the run.output_dir whose cache to manage (default outputs)"
    )
    group = cache_cmd.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="list the entries and the settings they were trained with")
    group.add_argument("--clear", action="store_true", help="remove every entry")
    cache_cmd.set_defaults(func=_cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after flags (`run X.yaml --resume a=1 b=2`).
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read where Ray starts, inherited by the workers a local instance starts
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a Ctrl-C
    except USER_ERRORS as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except (OSError, RayStartError) as exc:  # the machine, not the input: the traceback helps only with -v
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 2


def describe_error(exc: BaseException) -> str:
    """An error as one line: an OSError as `path: reason` (disk full, read-only, not a folder, ...),
    anything else by its message."""
    cause = getattr(exc, "cause", None)  # a Ray task's error that is also its cause's type: the cause says it
    if isinstance(cause, OSError) and cause is not exc:
        return describe_error(cause)
    if isinstance(exc, OSError) and exc.strerror:
        paths = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {exc.strerror}" if paths else exc.strerror
    if isinstance(exc, OSError):
        return " ".join(str(exc).split()) or type(exc).__name__  # e.g. pyarrow's, whose text names the path
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
