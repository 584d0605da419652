"""Arguments that select images: a manifest or image/mask folders, modality, sites, split."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import DataError

DATA_ENV = "M4OE_DATA"


def default_data_root() -> Path:
    """``$M4OE_DATA``, else ``../shared/data`` (relative to the working directory)."""
    return Path(os.environ.get(DATA_ENV, "../shared/data"))


def add_data_arguments(parser: argparse.ArgumentParser, *, masks: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=None,
        help=f"manifest CSV (dataset,modality,site,image,mask,split_hint) or a folder holding manifest.csv "
        f"(default: ${DATA_ENV} or ../shared/data)",
    )
    group.add_argument("--images", default=None, help="image folder (instead of a manifest)")
    if masks:
        group.add_argument("--masks", default=None, help="mask folder paired with --images by file name")
    group.add_argument("--site", default="local", help="site name for --images folders")
    group.add_argument("--split", default=None, help="only rows with this split_hint")
    group.add_argument("--slice-axis", type=int, default=None,
                       help="axis along which 3D volumes (NIfTI, NRRD, HDF5) are cut into 2D slices (default: a "
                       "known dataset's axis, else the coarsest-spacing axis in the header, else the shortest axis)")
    group.add_argument("--foreground-slices", action="store_true",
                       help="use only volume slices whose mask has foreground (default: every slice)")


def select_samples(args: argparse.Namespace, modality: str | None, sites=None):
    """Samples of ``modality`` (and ``sites``) from the manifest or folders named by the arguments."""
    from ..data import read_manifest, samples_from_folders, select

    volume_options = {"nonempty_slices": getattr(args, "foreground_slices", False),
                      "slice_axis": getattr(args, "slice_axis", None)}
    if args.images:
        samples = samples_from_folders(args.images, getattr(args, "masks", None), modality=modality or "unknown",
                                       site=args.site, **volume_options)
    else:
        root = Path(args.data) if args.data else default_data_root()
        manifest = root / "manifest.csv" if root.is_dir() else root
        if not manifest.exists():
            raise DataError(f"{manifest}: no manifest (give --data CSV or folder, or --images/--masks)")
        samples = read_manifest(manifest, **volume_options)
    chosen = select(samples, modality=modality, sites=sites, split=args.split)
    if not chosen:
        raise DataError(f"no images for modality {modality!r}, sites {sites or 'any'}, split {args.split or 'any'}")
    describe_volumes(chosen, volume_options["nonempty_slices"])
    return chosen


def describe_volumes(samples, foreground_only: bool) -> None:
    """Say how volumes were sliced (axis and slice count), so a wrong axis is seen before a long run."""
    volumes: dict[str, tuple[int, int]] = {}
    for sample in samples:
        if sample.slice_index is not None:
            axis, count = volumes.get(str(sample.image), (sample.slice_axis, 0))
            volumes[str(sample.image)] = (axis, count + 1)
    if not volumes:
        return
    axes = sorted({axis for axis, _ in volumes.values()})
    slices = sum(count for _, count in volumes.values())
    print(f"{len(volumes)} volume(s) cut along axis {', '.join(map(str, axes))} into {slices} slices "
          f"({'only slices with foreground' if foreground_only else 'every slice'}; --slice-axis and "
          "--foreground-slices change this)")


def comma_list(text: str | None) -> list[str] | None:
    return None if not text else [item.strip() for item in text.split(",") if item.strip()]
