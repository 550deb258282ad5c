"""``python -m lora_core <command>``: merge-into, merge-loras, extract, resize, add-difference, inspect.

Each command is a thin layer over ``lora_core.tools``; ``--help`` on each says what it does. Progress goes to
stderr (tqdm when it is installed). Errors print one line (``error: ...``), never a traceback, and exit with
status 2 for a wrong command line (a bad option or value, options that contradict each other, an output that is
also an input: ``UsageError``) or 1 for a file that is missing, unreadable, of the wrong kind or in the way.
Every argument is checked before any work, so a refused command has read no more than file headers and written
nothing. From another directory, ``python path/to/lora-core.py`` runs the same (see README).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from .blocks import Preset, PresetBook
from .errors import LoraError, LoraFileError
from .tools import common
from .tools.svd import DYNAMIC_METHODS

PROG = "python -m lora_core"
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2  # argparse's status for a bad command line; the tools' UsageError gets the same
EXIT_INTERRUPTED = 130

ITEM_HELP = ("a LoRA as PATH_OR_NAME[:RATIO[:BLOCKS]]; BLOCKS is a preset name or 12/17/20/26 block weights "
             "(e.g. my_lora.safetensors:0.8:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1)")


class _Progress:
    """tqdm bars on stderr (one per stage), or a line every 10% without tqdm; nothing with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._bar = None
        self._label = None
        self._printed = -1
        try:
            from tqdm import tqdm
            self._tqdm = tqdm
        except ImportError:
            self._tqdm = None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.quiet:
            return
        if label != self._label:
            self.close()
            self._label = label
            if self._tqdm is not None:
                self._bar = self._tqdm(total=total, desc=label, unit="t", file=sys.stderr, leave=False)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        elif total and (tenth := 10 * done // total) != self._printed:
            self._printed = tenth
            print(f"{label}: {done}/{total}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._printed = -1


def _presets(path: str | None) -> PresetBook | None:
    if path is None:
        return None
    common.require_file(path, "presets")
    try:
        book = PresetBook.load(path)
    except ValueError as error:  # UnicodeDecodeError included: a binary file
        raise LoraFileError(path, f"not a block-weight presets file ({error})") from None
    if not any(isinstance(line, Preset) for line in book.lines):
        raise LoraFileError(path, "holds no block-weight preset (lines NAME:w1,w2,...,wn)")
    for problem in book.problems:  # the WebUI keeps such lines as comments; say so, as it does
        print(f"warning: {path}: {problem}", file=sys.stderr)
    return book


def _metadata(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise common.UsageError(f"--metadata takes KEY=VALUE, not '{pair}'")
        out[key] = value
    return out


DEFAULT_CLAMP = 0.99


def _clamp(args: argparse.Namespace) -> float | None:
    if args.no_clamp and args.clamp_quantile is not None:
        raise common.UsageError("--clamp-quantile and --no-clamp contradict each other; give one")
    return None if args.no_clamp else (DEFAULT_CLAMP if args.clamp_quantile is None else args.clamp_quantile)


def _svd_only(args: argparse.Namespace) -> None:
    """merge-loras: options of the svd mode are refused in the others rather than ignored."""
    given = [flag for flag, value in (("--rank", args.rank), ("--conv-rank", args.conv_rank),
                                      ("--clamp-quantile", args.clamp_quantile), ("--no-clamp", args.no_clamp))
             if value not in (None, False)]
    if args.mode != "svd" and given:
        verb = "applies" if len(given) == 1 else "apply"
        raise common.UsageError(f"{', '.join(given)} only {verb} to --mode svd ({args.mode} keeps the ranks of its "
                                "inputs" + (" and adds them)" if args.mode == "concat" else ")"))
    if args.same_to_strength and args.mode != "sum":
        raise common.UsageError("--same-to-strength only applies to --mode sum")


def _saved_line(saved) -> str:
    return f"wrote {saved.path} (sshs_model_hash {saved.model_hash[:12]}, legacy {saved.legacy_hash})"


# ----------------------------------------------------------------------------------------------- commands

def _merge_into(args, progress) -> str:
    from .tools import merge_into
    result = merge_into(args.checkpoint, args.loras, args.output, save_precision=args.save_precision,
                        compute_precision=args.compute_precision, device=args.device,
                        presets=_presets(args.presets), lora_dirs=args.lora_dir, overwrite=args.overwrite,
                        metadata=_metadata(args.metadata), progress=progress)
    lines = [f"{m.name}: ratio {m.ratio}" + (f", blocks {m.blocks}" if m.blocks else "") +
             f", {m.layers} layers; {m.report}" for m in result.loras]
    return "\n".join(lines + [f"family {result.family.upper()}; " + _saved_line(result.saved)])


def _merge_loras(args, progress) -> str:
    from .tools import merge_loras
    _svd_only(args)
    result = merge_loras(args.loras, args.output, mode=args.mode, rank=args.rank, conv_rank=args.conv_rank,
                         clamp_quantile=_clamp(args), same_to_strength=args.same_to_strength,
                         save_precision=args.save_precision, device=args.device, presets=_presets(args.presets),
                         lora_dirs=args.lora_dir, title=args.title, include_modelspec=not args.no_modelspec,
                         metadata=_metadata(args.metadata), overwrite=args.overwrite, progress=progress)
    lines = [f"{result.mode} merge of {len(args.loras)} LoRAs: {result.modules} modules, ranks {result.ranks}"]
    if result.mode == "sum":
        lines.append("note: a sum merge approximates applying the LoRAs together (cross terms up_i @ down_j)")
    if result.dropped:
        lines.append(f"not carried over ({len(result.dropped)} keys of no module): {', '.join(result.dropped[:5])}")
    return "\n".join(lines + [_saved_line(result.saved)])


def _extract(args, progress) -> str:
    from .tools import extract
    result = extract(args.base, args.tuned, args.output, rank=args.rank, conv_rank=args.conv_rank,
                     clamp_quantile=_clamp(args), min_diff=args.min_diff,
                     v_parameterization=True if args.v_parameterization else None,
                     save_precision=args.save_precision, device=args.device,
                     include_modelspec=not args.no_modelspec, title=args.title, overwrite=args.overwrite,
                     progress=progress)
    te = ("text encoder included" if result.text_encoder else "text encoder left out (same as the base)") + \
        f", max |dW| {result.text_encoder_max_diff:.4g}"
    mean = sum(r.fro_retained for r in result.modules.values()) / max(len(result.modules), 1)
    return (f"{result.family.upper()}: {len(result.modules)} modules; {te}; mean Frobenius retained {mean:.2%}\n"
            + _saved_line(result.saved))


def _resize(args, progress) -> str:
    from .tools import resize
    result = resize(args.lora, args.output, rank=args.rank, conv_rank=args.conv_rank, dynamic=args.dynamic,
                    dynamic_param=args.dynamic_param, save_precision=args.save_precision, device=args.device,
                    overwrite=args.overwrite, progress=progress)
    report = result.report() if args.verbose else result.report().splitlines()[-1]
    return report + "\n" + _saved_line(result.saved)


def _add_difference(args, progress) -> str:
    from .tools import add_difference
    result = add_difference(args.a, args.b, args.c, args.output, multiplier=args.multiplier, blocks=args.blocks,
                            presets=_presets(args.presets), save_precision=args.save_precision,
                            compute_precision=args.compute_precision, device=args.device,
                            metadata=_metadata(args.metadata), overwrite=args.overwrite, progress=progress)
    kept = f"; {len(result.from_a)} tensors taken from A as they are" if result.from_a else ""
    return _saved_line(result.saved) + kept


def _inspect(args, progress) -> str:
    from .tools import format_report, inspect_lora, render_block_chart
    from .tools.inspect_cli import check_chart_path
    if args.plot:
        check_chart_path(args.plot, [args.lora, args.model])
    info = inspect_lora(args.lora, args.model)
    if args.plot:
        render_block_chart(info["block_norms"], args.plot, title=Path(args.lora).name)
    text = json.dumps(info, indent=2, default=str) if args.json else format_report(info)
    return text + (f"\nchart: {args.plot}" if args.plot and not args.json else "")


# ----------------------------------------------------------------------------------------------- parser

def _common(parser: argparse.ArgumentParser, *, save_default: str, compute: bool = False) -> None:
    parser.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (refused otherwise)")
    parser.add_argument("--save-precision", choices=common.SAVE_PRECISIONS, default=save_default,
                        help=f"dtype of the saved floating tensors (default {save_default})")
    if compute:
        parser.add_argument("--compute-precision", choices=common.COMPUTE_PRECISIONS, default="fp32",
                            help="dtype the merge is computed in (default fp32)")
    parser.add_argument("--device", default="cpu", help="where to compute: cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _clamp_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clamp-quantile", type=float,
                        help=f"clamp the factors to this quantile of their values, above 0 and at most 1 "
                             f"(default {DEFAULT_CLAMP}, as sd-scripts)")
    parser.add_argument("--no-clamp", action="store_true", help="keep every value (exact up to the rank)")


def _lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora-dir", action="append", default=[],
                        help="folder to find LoRAs named without a path (repeatable)")
    parser.add_argument("--presets", help="block-weight presets file (LBW's lbwpresets.txt format)")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like the tools' (its usage block would hide the message)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Merge, extract, resize and inspect LoRAs and checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("merge-into", help="bake LoRAs into a checkpoint",
                            description="Write CHECKPOINT with the LoRAs merged in: W += ratio * block weight * dW, "
                                        "every algorithm, streamed tensor by tensor.")
    p.add_argument("checkpoint", help="the base checkpoint (.safetensors, .ckpt)")
    p.add_argument("loras", nargs="+", metavar="LORA", help=ITEM_HELP)
    _common(p, save_default="fp16", compute=True)
    _lora_options(p)
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="extra metadata")
    p.set_defaults(run=_merge_into)

    p = commands.add_parser("merge-loras", help="combine LoRAs into one (sum, concat, svd)",
                            description="Merge LoRAs into one. sum: sd-scripts' formula, equal ranks, an "
                                        "approximation; concat: ranks add, exact; svd: per-module dW sum then "
                                        "truncated SVD to --rank.")
    p.add_argument("loras", nargs="+", metavar="LORA", help=ITEM_HELP)
    p.add_argument("--mode", choices=("sum", "concat", "svd"), default="svd", help="how to merge (default svd)")
    p.add_argument("--rank", type=int, help="new rank (svd)")
    p.add_argument("--conv-rank", type=int, help="new rank of k x k convs (svd; default --rank)")
    _clamp_options(p)
    p.add_argument("--same-to-strength", action="store_true",
                   help="sum: sqrt(|ratio|) on both factors, so a ratio acts once (supermerger's option)")
    _common(p, save_default="fp32")
    _lora_options(p)
    p.add_argument("--title", help="modelspec.title (default: the output's file name)")
    p.add_argument("--no-modelspec", action="store_true", help="write only sd-scripts' minimum ss_* metadata")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="extra metadata")
    p.set_defaults(run=_merge_loras)

    p = commands.add_parser("extract", help="extract a LoRA from a fine-tuned checkpoint and its base",
                            description="LoRA of tuned - base by truncated SVD, as sd-scripts' "
                                        "extract_lora_from_models.py writes it.")
    p.add_argument("--base", required=True, help="the original checkpoint")
    p.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
    p.add_argument("--rank", type=int, default=4, help="rank of linear and 1x1 layers (default 4)")
    p.add_argument("--conv-rank", type=int, help="rank of 3x3 convs; also extracts the res blocks (default: none)")
    _clamp_options(p)
    p.add_argument("--min-diff", type=float, default=0.01,
                   help="leave the text encoders out unless some weight differs by more (default 0.01)")
    p.add_argument("--v-parameterization", action="store_true", help="mark as v-prediction (default: SD2 only)")
    p.add_argument("--title", help="modelspec.title (default: the output's file name)")
    p.add_argument("--no-modelspec", action="store_true", help="write only sd-scripts' minimum ss_* metadata")
    _common(p, save_default="fp32")
    p.set_defaults(run=_extract)

    p = commands.add_parser("resize", help="change a LoRA's rank (fixed or dynamic)",
                            description="Truncated SVD of each LoRA module to a new rank; alpha keeps the scale "
                                        "(sd-scripts' resize_lora.py).")
    p.add_argument("lora")
    p.add_argument("--rank", type=int, default=4, help="new rank, or the most a dynamic rank keeps (default 4)")
    p.add_argument("--conv-rank", type=int, help="new rank of k x k convs (default --rank)")
    p.add_argument("--dynamic", choices=DYNAMIC_METHODS, help="choose each module's rank from its singular values")
    p.add_argument("--dynamic-param", type=float, help="the dynamic method's target (ratio, or a share 0..1)")
    p.add_argument("--verbose", action="store_true", help="print the retained energy of every module")
    _common(p, save_default="fp32")
    p.set_defaults(run=_resize)

    p = commands.add_parser("add-difference", help="A + M * (B - C) over three checkpoints",
                            description="Write A + M * (B - C); M per block with --blocks.")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("c")
    p.add_argument("--multiplier", "-m", type=float, default=1.0, help="M (default 1)")
    p.add_argument("--blocks", help="M per block: a preset name or 12/17/20/26 values")
    p.add_argument("--presets", help="block-weight presets file")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="extra metadata")
    _common(p, save_default="fp16", compute=True)
    p.set_defaults(run=_add_difference)

    p = commands.add_parser("inspect", help="describe a LoRA: family, algorithms, ranks, hashes, block influence",
                            description="Family, algorithm and rank/alpha per module, metadata, hashes and the "
                                        "influence of each block (||dW|| summed per block).")
    p.add_argument("lora")
    p.add_argument("--model", help="a checkpoint: map the file exactly and count every algorithm")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="PNG", help="draw the block influence chart into this PNG")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    progress = _Progress(args.quiet)
    run: Callable = args.run
    try:
        text = run(args, progress)
    except common.UsageError as error:
        message, status = str(error), EXIT_USAGE
    except (LoraError, ValueError, OSError) as error:
        message, status = str(error), EXIT_BAD_INPUT
    except KeyboardInterrupt:  # the tools write to a temporary file and rename it only when done
        message, status = "interrupted; nothing was written", EXIT_INTERRUPTED
    else:
        progress.close()
        print(text)
        return 0
    progress.close()
    print("error: " + " ".join(message.splitlines()), file=sys.stderr)
    return status
