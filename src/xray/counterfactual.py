"""``python -m xray.counterfactual CKPT --input DIR``: does the model read the lungs or the acquisition?

Each film is scored as it is and with one acquisition cue added at a time (burned-in text, side
markers, tight collimation, shutters, padding, and text + marker + crop together), as ``predict.py``
would score such a file; per class, the mean change of the calibrated logit and the calls that flip.
Films under ``NORMAL/`` and ``PNEUMONIA/`` folders are reported per class. For example, the official
``val/`` folder's NORMAL films::

    python -m xray.counterfactual pretrained --input data/chest_xray/val
"""

from __future__ import annotations

import argparse
import sys

from xray.core.errors import UserError
from xray.inference.counterfactual import FAMILIES, counterfactual_check, render_rows
from xray.inference.predict import collect_inputs
from xray.inference.predictor import load_predictor


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the table; 2 with one ``error:`` line for a bad checkpoint, input or family."""
    parser = argparse.ArgumentParser(
        prog="python -m xray.counterfactual", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "ckpt", help="a checkpoint, an ensemble folder, best, last or pretrained (or ckpt=...)"
    )
    parser.add_argument("--input", required=True, help="a file, a folder (recursive), a glob or a .txt list")
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated, from: {', '.join(FAMILIES)}"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds each film's cue (size, place, text)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log-dir", default="logs", help="where ckpt=best|last looks")
    args = parser.parse_args(argv)
    try:
        predictor = load_predictor(args.ckpt.removeprefix("ckpt="), args.log_dir)
        paths = collect_inputs(args.input)
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        rows, failed = counterfactual_check(predictor, paths, families, seed=args.seed, device=args.device)
    except (UserError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, reason in failed.items():
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{predictor.source}: {len(paths) - len(failed)} films; calibrated logit, with the cue minus as is")
    print("\n".join(render_rows(rows, predictor.threshold)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
