"""``python -m xray.encoding CKPT --from TRAIN_DIR``: record the training files' shared size and JPEG
quality in a checkpoint made before checkpoints stored it (``--clear`` removes it), so prediction gives
inputs that encoding. ``python -m xray.data.encoding``, its former name, still works."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xray.core.checkpoint_io import load_checkpoint_file
from xray.data.encoding import detect_source_encoding
from xray.data.records import find_images
from xray.inference.checkpoints import update_checkpoint_meta


def main(argv: list[str] | None = None) -> int:
    """``python -m xray.encoding CKPT_OR_FOLDER --from TRAIN_DIR``: record (or ``--clear``) it."""
    parser = argparse.ArgumentParser(prog="python -m xray.encoding", description=main.__doc__)
    parser.add_argument("ckpt", type=Path, help="a .ckpt file or a folder of them (an ensemble)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", type=Path, help="the training images the model learned from")
    source.add_argument("--clear", action="store_true", help="remove the recorded encoding")
    args = parser.parse_args(argv)
    targets = sorted(args.ckpt.glob("*.ckpt")) if args.ckpt.is_dir() else [args.ckpt]
    if not targets or not all(p.is_file() for p in targets):
        print(f"error: {args.ckpt}: no checkpoint file there", file=sys.stderr)
        return 2
    encoding = None
    if not args.clear:
        files = find_images(args.source)
        encoding = detect_source_encoding(files)
        if encoding is None:
            print(
                f"error: {args.source}: its {len(files)} images share no one JPEG size and quality",
                file=sys.stderr,
            )
            return 2
    for path in targets:
        preprocessing = dict(load_checkpoint_file(path)["xray"]["preprocessing"])
        if encoding is None:
            preprocessing.pop("source_encoding", None)
        else:
            preprocessing["source_encoding"] = encoding.to_meta()
        update_checkpoint_meta(path, preprocessing=preprocessing)
        print(f"{path}: source_encoding = {preprocessing.get('source_encoding')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
