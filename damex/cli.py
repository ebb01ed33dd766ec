"""The single entry point: ``damex <command> ...``; ``tools/*.py`` call into it.

Commands import their heavy dependencies lazily (the function-local imports below are deliberate)
so ``damex --help`` answers at once without loading torch.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from damex.config import TokenSelection, choices
from damex.errors import DamexError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("damex")

_CONFIG_HELP = (
    "YAML config (default: the built-in benchmark's DAMEX config, "
    "configs/synthetic/damex_small.yaml)"
)
_OVERRIDES_HELP = (
    "config overrides as key=value (YAML values), e.g. train.lr=2e-4 "
    "'data.train=[coco, voc07]' moe.num_experts=4"
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, help=_CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a detector (default: DAMEX on the built-in benchmark), evaluate it, "
        "and write the routing report",
        description=(
            "Train with a config. With no arguments this trains the small DAMEX config on the "
            "built-in synthetic benchmark (generated on first use), evaluates AP per dataset and "
            "writes the expert-routing report. Under torchrun it runs distributed (DDP)."
        ),
    )
    _add_config_args(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue exactly from a checkpoint (default: OUTPUT_DIR/last.pth)",
    )
    p.add_argument("--no-report", action="store_true", help="skip the routing report at the end")


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="COCO AP per dataset for a checkpoint",
        description="Per-dataset COCO AP/AP50/AP75/APs/APm/APl/AR100 and their mean; writes "
        "results.json, results.md and detections with native category ids.",
    )
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="a .pth written by train")
    p.add_argument("--datasets", nargs="+", default=None, help="subset of the test datasets")
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    p.add_argument(
        "--restrict",
        action="store_true",
        help="also report the oracle that restricts scores to each image's dataset labels",
    )


def _add_visualize_routing_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize-routing",
        help="datasets x experts heatmaps, routing accuracy and per-image overlays (HTML report)",
    )
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default=None, help="report folder (default: next to the checkpoint)")
    p.add_argument(
        "--tokens",
        default=None,
        choices=choices(TokenSelection),
        help="which decoder tokens to count (default: eval.routing_tokens)",
    )


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="draw detections on an image or a folder of images")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="folder for the annotated images")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=0.15,
        help="draw detections scoring at least this (default 0.15: sigmoid focal-loss scores of "
        "a briefly trained model are low); with --explain the floor of the per-image threshold",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="explained predictions: per image a JSON (box, score, label in its dataset's own "
        "class name, that dataset, and per MoE layer the chosen expert, its gate probability "
        "and the datasets mapped to it) and an overlay showing label, score and expert of the "
        "top boxes (per-image threshold, duplicates removed, labels placed apart, small "
        "images enlarged to >= 512 px)",
    )
    p.add_argument(
        "--top", type=int, default=20, help="with --explain: at most this many boxes drawn"
    )


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (normalized image -> boxes, scores, labels, experts)",
        description=(
            "Export the inference graph of a trained detector to ONNX: input 'images' float32 "
            "[B, 3, H, W], RGB normalized with the model's pixel mean/std (no padding); outputs "
            "'boxes' [B, K, 4] xyxy in input pixels, 'scores' [B, K], 'labels' [B, K] (unified "
            "label indices; the checkpoint's label space names them), 'query' [B, K] (the query "
            "of each detection) and 'experts' [B, Q, L] (top-1 expert of every query in each of "
            "the L MoE layers). MoE layers are exported with static shapes (every expert on "
            "every token, masked by the routing: same outputs). Opset >= 16 (grid_sample). "
            "After writing, the ONNX file is run with onnxruntime on --check-images (default: a "
            "random input) and compared with PyTorch."
        ),
    )
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="a .pth written by train / extend")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        default=None,
        help="input size of the graph (default: data.test_scale x min(data.max_size, "
        "test_scale)); resize images to it before running the model",
    )
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width axes")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16; default 18)")
    p.add_argument(
        "--check-images",
        default=None,
        help="an image or folder: compare onnxruntime with PyTorch on these (resized to "
        "--image-size) and print the largest box/score differences and expert mismatches",
    )


def _add_extend_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extend",
        help="add a dataset to a trained model (one more expert, router row, label block)",
        description=(
            "Grow a trained DAMEX model by the new dataset(s) of CONFIG: every MoE layer gets "
            "one more expert (initialised from the expert the new data is routed to most, or "
            "from the mean of the experts), the router one more row, the label space the new "
            "datasets' blocks after the old slots (old ids unchanged). CONFIG is the old run's "
            "config with moe.num_experts one larger, the new dataset in data.train (what is "
            "trained on), every dataset in data.test (what is evaluated) and in "
            "moe.expert_map. By default only the new parameters train (the new expert, the "
            "router's new row, the new label rows); everything else stays bit-identical, and "
            "an old dataset's image that never picks the new expert is detected exactly as "
            "before. Writes a normal run folder (config.yaml, last.pth/best.pth, eval)."
        ),
    )
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="the trained model (RUN/best.pth)")
    p.add_argument(
        "--init",
        choices=["routed", "mean"],
        default="routed",
        help="new expert (and router row) = copy of the expert the new data is routed to most "
        "by the old model (per layer, top-1 of the matching queries on up to 32 training "
        "images), or the mean of the old experts (default: routed)",
    )
    p.add_argument(
        "--train",
        choices=["new", "decoder", "all"],
        default="new",
        dest="train_mode",
        help="what trains: only the new parameters (default), also the decoder and its heads, "
        "or the whole model (plain fine-tuning)",
    )
    p.add_argument(
        "--replay",
        type=float,
        default=0.0,
        metavar="PERCENT",
        help="also train on this percent of every old dataset's training images "
        "(data.limited, proportional sampling; default 0: new data only)",
    )


def _add_propose_map_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "propose-map",
        help="propose a dataset -> expert map (moe.expert_map) by clustering the datasets",
        description=(
            "Summarise every training dataset by the mean of per-image descriptors and group "
            "the datasets into --num-experts clusters (Ward + k-means, damex.moe."
            "propose_mapping). Without --checkpoint the descriptor is an appearance signature "
            "that needs no model (joint RGB histogram + gray-level and gradient statistics of "
            "a 64x64 thumbnail); with --checkpoint it is the trained backbone's mean-pooled "
            "last feature map. Prints the per-dataset statistics, the distances between "
            "datasets and the clusters, and writes the map as YAML for the config. Datasets "
            "share an expert only when there are more datasets than experts: the closest ones "
            "(same look: palette, texture, rendering) are merged first."
        ),
    )
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="use this model's backbone features")
    p.add_argument(
        "--num-experts",
        type=int,
        default=None,
        help="number of experts (default: moe.num_experts of the config)",
    )
    p.add_argument(
        "--images", type=int, default=32, help="training images per dataset (default 32)"
    )
    p.add_argument("--out", default=None, help="write the YAML here (default: print only)")


def _add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="speed benchmarks: moe | model")
    p.add_argument("what", choices=["moe", "model"])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")


def build_parser() -> argparse.ArgumentParser:
    """The ``damex`` parser: one subcommand each, in the order ``damex --help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="damex",
        description=(
            "DAMEX: a DINO detector whose decoder FFNs are dataset-aware mixtures of experts, "
            "trained on a mixture of datasets."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_visualize_routing_parser(sub)
    _add_demo_parser(sub)

    p = sub.add_parser("config", help="print the resolved config (after _base_ and overrides)")
    _add_config_args(p)

    p = sub.add_parser("make-synthetic", help="generate the built-in multi-domain benchmark")
    p.add_argument(
        "--out", default=None, help="output folder (default: data/synthetic, or with --alt "
        "data/synthetic_alt / with --conflict data/synthetic_conflict, where the catalog looks "
        "for the alt_* / conf_* datasets)"
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every image count")
    p.add_argument("--image-size", type=int, default=256, help="longest image side in pixels")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--alt", action="store_true",
        help="the second benchmark (damex.data.synthetic_alt: 4 other domains, 10:1 sizes)",
    )  # fmt: skip
    which.add_argument(
        "--conflict", action="store_true",
        help="the domain-conflict benchmark (damex.data.synthetic_conflict: the same shapes "
        "under different label blocks in different styles, plus a control dataset)",
    )  # fmt: skip

    for name, text in (
        ("prepare-uodb", "rebuild UODB as COCO JSON from the original releases"),
        ("make-subsets", "write seeded P%% image subsets (the limited-data fsPerc files)"),
        ("experiments", "run a multi-seed experiment spec (variants x seeds), resumable; tables"),
    ):
        sub.add_parser(name, help=text, add_help=False)  # arguments: see _DELEGATED

    _add_export_parser(sub)
    _add_extend_parser(sub)
    _add_propose_map_parser(sub)
    _add_benchmark_parser(sub)
    return parser


def _load(args: argparse.Namespace):  # -> Config
    from damex.config import load_config

    return load_config(args.config, args.overrides)


def _check_dataset_names(cfg) -> None:  # cfg: Config
    """Unknown dataset names fail here, before a benchmark is generated or an output written."""
    from damex.data.catalog import build_catalog
    from damex.errors import ConfigError, DatasetError

    catalog = build_catalog(cfg.data)
    for key, names in (("data.train", cfg.data.train), ("data.test", cfg.eval_datasets)):
        for name in names:
            try:
                catalog.get(name)
            except DatasetError as e:
                raise ConfigError(f"{key}: {e}") from None


def _check_checkpoint(path: str) -> None:
    """A missing, truncated or damaged checkpoint fails here, before any output is written."""
    from damex.engine.checkpoint import verify_checkpoint_file
    from damex.errors import CheckpointError

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_checkpoint_file(path)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # config errors first, before the heavy imports
    _check_dataset_names(cfg)
    from damex.engine.trainer import train

    result = train(cfg, resume=args.resume or False)
    if not result.is_main_process:
        return 0
    if result.final_results is not None:
        minutes = result.elapsed_s / 60
        print(f"\nAP per dataset ({result.iterations} iterations, {minutes:.1f} min):")
        print(result.final_results.to_markdown())
    if not args.no_report and cfg.uses_moe:
        from damex.engine.report import visualize_routing

        report = visualize_routing(
            cfg,
            result.checkpoint,
            Path(cfg.output.dir) / "routing",
            precomputed=(result.final_results, result.final_routing),
        )
        overview = (report.parent / "routing.md").read_text().split("###")[0].strip()
        print(f"\nRouting of held-out test images (no dataset id given to the model):\n{overview}")
        print(f"\nrouting report: {report}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_dataset_names(cfg)
    _check_checkpoint(args.checkpoint)
    from damex.engine.report import evaluate_checkpoint

    results = evaluate_checkpoint(
        cfg, args.checkpoint, datasets=args.datasets, out_dir=args.out, restrict=args.restrict
    )
    if results is not None:  # None on ranks other than 0 under torchrun
        print(results.to_markdown())
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_dataset_names(cfg)
    _check_checkpoint(args.checkpoint)
    from damex.engine.report import visualize_routing

    out = args.out or str(Path(args.checkpoint).resolve().parent / "routing")
    report = visualize_routing(cfg, args.checkpoint, out, tokens=args.tokens)
    print(f"routing report: {report}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_dataset_names(cfg)
    _check_checkpoint(args.checkpoint)
    from damex.engine.report import run_demo

    if args.explain:
        from damex.engine.report import run_explained_demo

        written = run_explained_demo(
            cfg,
            args.checkpoint,
            args.input,
            args.out,
            min_score=args.score_threshold,
            top_n=args.top,
        )
        print(f"wrote {len(written)} explained image(s) (.png + .json) to {args.out}")
        return 0
    written = run_demo(cfg, args.checkpoint, args.input, args.out, args.score_threshold)
    print(f"wrote {len(written)} annotated image(s) to {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_checkpoint(args.checkpoint)
    from damex.export import export_checkpoint

    report = export_checkpoint(
        cfg,
        args.checkpoint,
        args.out,
        image_size=tuple(args.image_size) if args.image_size else None,
        dynamic=args.dynamic,
        opset=args.opset,
        check_images=args.check_images,
    )
    print(report.summary())
    return 0


def _cmd_extend(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_dataset_names(cfg)
    _check_checkpoint(args.checkpoint)
    from damex.engine.extend import ExtendOptions, extend

    options = ExtendOptions(init=args.init, train=args.train_mode, replay=args.replay)
    result = extend(cfg, args.checkpoint, options)
    if result.is_main_process and result.final_results is not None:
        print(f"\nAP per dataset after extending ({result.iterations} iterations):")
        print(result.final_results.to_markdown())
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _cmd_propose_map(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_dataset_names(cfg)
    if args.checkpoint:
        _check_checkpoint(args.checkpoint)
    from damex.engine.propose import propose_expert_map

    proposal = propose_expert_map(
        cfg,
        checkpoint=args.checkpoint,
        num_experts=args.num_experts,
        images_per_dataset=args.images,
    )
    print(proposal.report())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(proposal.to_yaml(), encoding="utf-8")
        print(f"\nwrote {args.out}")
    else:
        print("\n" + proposal.to_yaml(), end="")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from damex.config import config_to_yaml

    print(config_to_yaml(_load(args)), end="")
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from damex.data.synthetic import generate_benchmark
    from damex.errors import DatasetError

    default = "data/synthetic_conflict" if args.conflict else "data/synthetic"
    out = args.out or ("data/synthetic_alt" if args.alt else default)
    if Path(out).exists() and not Path(out).is_dir():
        raise DatasetError(f"--out {out} is a file; expected a folder for the benchmark")

    if args.alt:
        from damex.data.synthetic_alt import generate_alt_benchmark

        summary = generate_alt_benchmark(
            Path(out), seed=args.seed, scale=args.scale, image_size=args.image_size
        )
    elif args.conflict:
        from damex.data.synthetic_conflict import generate_conflict_benchmark

        summary = generate_conflict_benchmark(
            Path(out), seed=args.seed, scale=args.scale, image_size=args.image_size
        )
    else:
        summary = generate_benchmark(
            Path(out), seed=args.seed, scale=args.scale, image_size=args.image_size
        )
    print(summary if isinstance(summary, str) else _format_summary(summary))
    return 0


def _format_summary(summary: object) -> str:
    import json

    return json.dumps(summary, indent=2, default=str)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    if args.out and not Path(args.out).resolve().parent.is_dir():  # fail before a long run
        parent = str(Path(args.out).resolve().parent)
        raise FileNotFoundError(errno.ENOENT, "--out: folder does not exist", parent)
    if args.what == "moe":
        from damex.moe.bench import format_moe_table, run_moe_benchmark

        kwargs = {}
        if args.quick:
            kwargs = {"tokens": (1800, 3600), "experts": (0, 2, 8, 16), "repeats": 3}
        table = format_moe_table(run_moe_benchmark(**kwargs))
    else:
        from damex.modeling.bench import format_model_table, run_model_benchmark

        table = format_model_table(run_model_benchmark(quick=args.quick))
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def _cmd_prepare_uodb(argv: list[str]) -> int:
    from damex.data.converters.prepare import main as prepare_main

    return prepare_main(argv, prog="damex prepare-uodb")


def _cmd_make_subsets(argv: list[str]) -> int:
    from damex.data.subsets import main as subsets_main

    return subsets_main(argv)


def _cmd_experiments(argv: list[str]) -> int:
    from damex.experiments.cli import main as experiments_main

    return experiments_main(argv)


# commands with their own argument parser: everything after the command name goes to them
_DELEGATED = {
    "prepare-uodb": _cmd_prepare_uodb,
    "make-subsets": _cmd_make_subsets,
    "experiments": _cmd_experiments,
}

_COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "visualize-routing": _cmd_visualize,
    "demo": _cmd_demo,
    "config": _cmd_config,
    "make-synthetic": _cmd_make_synthetic,
    "benchmark": _cmd_benchmark,
    "export": _cmd_export,
    "extend": _cmd_extend,
    "propose-map": _cmd_propose_map,
}


# OS errors that mean "this path cannot be used" (a user error, reported in one line); any other
# exception is a bug and keeps its traceback.
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG}


def _is_path_error(exc: BaseException) -> bool:
    if not isinstance(exc, OSError) or exc.filename is None:
        return False
    return isinstance(exc, _PATH_ERRORS) or exc.errno in _USER_ERRNOS


def _report_error(command: str, exc: BaseException, verbose: bool) -> int:
    """Print one ``damex COMMAND: error: ...`` line (the traceback too with ``-v``); exit 2."""
    if verbose:
        traceback.print_exception(exc)
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        message = f"{where}: {exc.strerror or exc}"
    else:
        message = str(exc)
    print(f"damex {command}: error: {message}", file=sys.stderr)
    return 2


def _record_for_torchrun(exc: BaseException) -> None:
    """Under ``torchrun``, write the error where its failure summary reads it ("Root Cause")."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception:  # the summary is a convenience; the error itself is printed anyway
        logger.debug("could not record the error for torchrun", exc_info=True)


def _run(command: str, verbose: bool, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except DamexError as exc:
        _record_for_torchrun(exc)
        return _report_error(command, exc, verbose)
    except OSError as exc:
        _record_for_torchrun(exc)
        if not _is_path_error(exc):
            raise
        return _report_error(command, exc, verbose)
    except Exception as exc:
        _record_for_torchrun(exc)
        raise
    except KeyboardInterrupt:
        print(f"damex {command}: interrupted", file=sys.stderr)
        return 130


def run_reporting_errors(command: str, argv: Sequence[str], fn: Callable[[], int]) -> int:
    """Run ``fn`` as ``damex COMMAND`` would: the project's own errors and unusable paths print
    one ``damex COMMAND: error: ...`` line and give exit code 2 (``-v`` / ``--verbose`` in
    ``argv`` also prints the traceback); for the tools outside the CLI (``tools/benchmark.py``).
    """
    return _run(command, "-v" in argv or "--verbose" in argv, fn)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the process exit code.

    The project's own errors (:class:`damex.errors.DamexError`: bad config, data, checkpoint)
    and unusable paths (missing, a file where a folder is expected, no permission, disk full)
    print one ``damex COMMAND: error: ...`` line naming the file / key / line and exit with 2
    (``-v`` also prints the traceback). Any other exception is a bug: it keeps its traceback.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        command, rest = argv[0], argv[1:]
        return _run(command, "-v" in rest or "--verbose" in rest, lambda: _DELEGATED[command](rest))
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return _run(args.command, args.verbose, lambda: _COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
