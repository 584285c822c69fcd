"""``python -m xray.download``: fetch a chest X-ray dataset into ROOT/{train,test[,val]}/{NORMAL,PNEUMONIA}
(interrupted downloads resume). ``python -m xray.data.download``, its former name, still works."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xray.data.download import (
    MENDELEY_DOI,
    SOURCES,
    DatasetNotFoundError,
    DownloadError,
    ask,
    count_images,
    dataset_present,
    download_dataset,
    stdin_is_tty,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xray.download",
        description=(
            "Download a chest X-ray dataset and unpack it into ROOT/{train,test[,val]}/{NORMAL,PNEUMONIA}. "
            "Interrupted downloads resume. Sources: kermany = Kermany et al., Mendeley Data V2, "
            f"doi:{MENDELEY_DOI} (CC BY 4.0, ~1.2 GB); pneumoniamnist = MedMNIST+ PneumoniaMNIST, "
            "Zenodo 10519652 (CC BY 4.0), as PNG files."
        ),
    )
    parser.add_argument("--source", choices=sorted(SOURCES), default="kermany")
    parser.add_argument(
        "--root", type=Path, help="dataset root (default: data/chest_xray, or data/pneumoniamnist_SIZE)"
    )
    parser.add_argument("--size", type=int, choices=(64, 128, 224), default=224, help="pneumoniamnist only")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--url", help="download from this URL instead (a mirror)")
    digest = parser.add_mutually_exclusive_group()
    digest.add_argument("--md5", help="expected md5 of the file at --url")
    digest.add_argument("--sha256", help="expected sha256 of the file at --url")
    parser.add_argument("--cache-dir", type=Path, help="where downloads go (default ROOT/../.downloads)")
    parser.add_argument(
        "--keep-archive", action="store_true", help="keep the downloaded file after unpacking"
    )
    parser.add_argument("--timeout", type=float, default=60, help="network timeout in seconds (default 60)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 error or declined, 130 interrupted)."""
    args = _parser().parse_args(argv)
    spec = SOURCES[args.source]
    root: Path = (args.root if args.root is not None else Path(spec.root_for(args.size))).expanduser()
    what = spec.describe(args.size)
    try:
        if dataset_present(root):
            print(f"Dataset already present at {root}; nothing to do.")
            return 0
        if not args.yes and stdin_is_tty() and not ask(f"Download {what} to {root}? [y/N] "):
            print("Aborted.", file=sys.stderr)
            return 1
        print(
            f"Downloading {what}\n  from {args.url or spec.url_for(args.size)}\n  licence {spec.license}: "
            f"{spec.citation}",
            file=sys.stderr,
        )
        download_dataset(
            root,
            args.source,
            args.size,
            url=args.url,
            md5=args.md5,
            sha256=args.sha256,
            cache_dir=args.cache_dir,
            keep_archive=args.keep_archive,
            progress=not args.no_progress,
            timeout=args.timeout,
        )
    except (DownloadError, DatasetNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; run the same command again to resume the download.", file=sys.stderr)
        return 130
    counts = count_images(root)
    summary = ", ".join(
        f"{split}: " + " / ".join(f"{n} {c}" for c, n in per.items()) for split, per in counts.items()
    )
    print(f"Dataset ready at {root} ({summary}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
