"""The ``hf-resdecay`` command: ``evaluate`` scores a checkpoint, ``align`` measures residual alignment,
``convert`` turns a released checkpoint into a ``save_pretrained`` folder.

This module builds the parser and dispatches: ``evaluate`` is :mod:`hf_resdecay.evaluation.command`, ``align``
is :mod:`hf_resdecay.alignment.command`.

``hf-resdecay convert SRC DST --format {decay-mae,mae,sit}`` converts the authors' decayed MAE, a
facebookresearch/mae checkpoint or the authors' SiT, and prints which tensors were mapped, dropped or fresh.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .alignment.command import add_align_command
from .evaluation._checks import integer_at_least
from .evaluation.command import add_evaluate_command


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-resdecay`` parser with its three subcommands; each sets ``handler`` to run it."""
    parser = argparse.ArgumentParser(prog="hf-resdecay", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hf_resdecay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    add_evaluate_command(commands)
    add_align_command(commands)
    _add_convert_command(commands)
    return parser


_CONVERT_OPTIONS: dict[str, dict[str, str]] = {
    "decay-mae": {
        "min_decay": "min_decay",
        "num_attention_heads": "num_attention_heads",
        "decoder_num_attention_heads": "decoder_num_attention_heads",
        "mask_ratio": "mask_ratio",
        "norm_pix_loss": "norm_pix_loss",
    },
    "mae": {
        "shortcut_decay": "shortcut_decay",
        "full_recipe": "full_recipe",
        "num_attention_heads": "num_attention_heads",
        "decoder_num_attention_heads": "decoder_num_attention_heads",
        "mask_ratio": "mask_ratio",
        "norm_pix_loss": "norm_pix_loss",
    },
    "sit": {
        "min_decay": "min_sigma",
        "num_attention_heads": "num_attention_heads",
        "num_classes": "num_classes",
        "keep_sigma": "keep_sigma",
    },
}
"""For each ``--format``: the command-line options it takes and the converter argument each one sets."""


def _add_convert_command(commands: argparse._SubParsersAction) -> None:
    """Register ``hf-resdecay convert``."""
    from .convert import FORMATS

    convert = commands.add_parser(
        "convert",
        help="convert a released checkpoint (decayed MAE, MAE, SiT) into a save_pretrained folder",
        description="Convert a released PyTorch checkpoint into a save_pretrained folder of hf_resdecay's "
        "models, and print which tensors were mapped, dropped (with the reason) or start fresh. The file is "
        "read with torch.load(weights_only=True): it cannot run code.",
    )
    convert.add_argument("source", type=Path, help="checkpoint file (.pth, .pt, or .safetensors)")
    convert.add_argument("destination", type=Path, help="output folder (must be empty unless --overwrite)")
    convert.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="decay-mae: the authors' decayed MAE; mae: facebookresearch/mae; sit: the authors' SiT",
    )
    convert.add_argument(
        "--min-decay",
        "--min-sigma",
        dest="min_decay",
        type=float,
        default=None,
        help="decay-mae, sit: alpha_min the model was trained with (the release's --min_decay or "
        "--min-sigma); default: the checkpoint's saved args",
    )
    convert.add_argument(
        "--shortcut-decay",
        type=float,
        default=None,
        help="mae: retrofit decayed encoder shortcuts, 1 - alpha_min in [0, 1) (default 0: plain MAE)",
    )
    convert.add_argument(
        "--full-recipe",
        action="store_true",
        help="mae: also drop the final encoder LayerNorm and use the recipe's skip decoder (fresh skips)",
    )
    convert.add_argument(
        "--num-attention-heads",
        type=integer_at_least(1),
        default=None,
        help="default: the standard table by width",
    )
    convert.add_argument(
        "--decoder-num-attention-heads",
        type=integer_at_least(1),
        default=None,
        help="decay-mae, mae: default 16",
    )
    convert.add_argument(
        "--mask-ratio", type=float, default=None, help="decay-mae, mae: default saved args or 0.75"
    )
    convert.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decay-mae, mae: default saved args or off",
    )
    convert.add_argument(
        "--num-classes", type=integer_at_least(1), default=None, help="sit: default saved args"
    )
    convert.add_argument(
        "--keep-sigma",
        action="store_true",
        help="sit: keep the learned-sigma output channels (the release's forward discards them)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace the files of a non-empty destination"
    )
    convert.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Handler of ``hf-resdecay convert``: convert and print the report; 2 for a missing or taken path."""
    from .convert import convert_checkpoint

    accepted = _CONVERT_OPTIONS[args.format]
    options = {}
    for dest in sorted({name for names in _CONVERT_OPTIONS.values() for name in names}):
        value = getattr(args, dest)
        if value is None or value is False:
            continue
        if dest not in accepted:
            formats = ", ".join(name for name, names in _CONVERT_OPTIONS.items() if dest in names)
            raise ValueError(f"--{dest.replace('_', '-')} applies to --format {formats} only")
        options[accepted[dest]] = value
    try:
        report = convert_checkpoint(
            args.source, args.destination, args.format, overwrite=args.overwrite, **options
        )
    except (FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"saved: {args.destination}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; a ``ValueError`` becomes one ``error:`` line and status 2."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what ``--num-processes`` launches again
    try:
        return args.handler(args)
    except ValueError as error:  # bad input found after parsing: say it plainly, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
