"""``python -m xray.paired CKPT --originals DIR --copies DIR``: the same films as originals and as the
copies the model trained on; per class, how far the calibrated logit moves from copy to original."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xray.core.checkpoint_io import CheckpointError
from xray.core.constants import CLASSES
from xray.inference.paired import find_pairs, paired_shift
from xray.inference.predictor import load_predictor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xray.paired", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "ckpt", help="a checkpoint, an ensemble folder, best, last or pretrained (bare, or as ckpt=...)"
    )
    parser.add_argument("--originals", type=Path, required=True, help="ROOT/{NORMAL,PNEUMONIA} of originals")
    parser.add_argument(
        "--copies", type=Path, required=True, help="the same names, as the model trained on them"
    )
    parser.add_argument("--log-dir", default="logs", help="where ckpt=best|last looks")
    args = parser.parse_args(argv)
    try:
        predictor = load_predictor(args.ckpt.removeprefix("ckpt="), args.log_dir)
        pairs = find_pairs(args.originals, args.copies)
        encodings = {e for _, _, e in predictor.preprocessing}
        modes = [True, False] if encodings != {None} else [False]
        print(f"{predictor.source}: {len(pairs)} pairs; calibrated logit, original minus copy")
        print("| inputs | " + " | ".join(CLASSES) + " |")
        print("|---|" + "---:|" * len(CLASSES))
        for match in modes:
            cells = [
                f"{s.mean:+.2f} ± {s.sd:.2f} ({s.flips}/{s.n} flip)"
                for s in paired_shift(predictor, pairs, match)
            ]
            what = "with the training files' encoding" if match else "as read"
            print(f"| {what} | " + " | ".join(cells) + " |")
    except (ValueError, OSError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
