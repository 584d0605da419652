"""``m4oe pretrain``: SimMIM self-supervised pretraining of a Swin backbone on unlabeled images."""
from __future__ import annotations

import argparse

from .common import add_runtime_arguments, add_threads_argument, json_mapping, runtime_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="SimMIM masked-image pretraining on unlabeled images")
    parser.add_argument("sources", nargs="+", help="manifest CSVs, data folders with manifest.csv, image folders")
    parser.add_argument("--out", required=True, help="output folder (backbone/, checkpoint, log.csv, previews)")
    parser.add_argument("--arch", default="swin_tiny_patch4_window7_224", help="timm Swin architecture")
    parser.add_argument("--model-args", type=json_mapping, default=None,
                        help='e.g. \'{"embed_dim": 48, "depths": [2,2,6,2], "num_heads": [3,6,12,24]}\'')
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=224, help="size the backbone is configured for")
    parser.add_argument("--crop-size", type=int, default=128, help="pretraining crop size (multiple of 32)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1.5e-4)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude-sites", default="",
                        help="comma-separated sites or datasets never to pretrain on (the sites you will call "
                             "unseen), e.g. CHASE_DB1,Kvasir-SEG,CVC-ClinicDB,imlab-demo; recorded in config.json")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--slice-axis", type=int, default=None,
                        help="axis along which 3D volumes are cut into 2D slices (default: a known dataset's axis, "
                             "else the coarsest-spacing axis in the header, else the shortest axis)")
    parser.add_argument("--preview-every", type=int, default=250)
    add_threads_argument(parser)
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of the saved weights")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/pretrain_checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true")
    add_runtime_arguments(parser, precision=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pretrain import pretrain

    folder = pretrain(
        args.sources, args.out, arch=args.arch, model_args=args.model_args, in_chans=args.in_chans,
        img_size=args.img_size, crop_size=args.crop_size, batch_size=args.batch, steps=args.steps, lr=args.lr,
        mask_ratio=args.mask_ratio, seed=args.seed,
        exclude_sites=[name for name in args.exclude_sites.split(",") if name.strip()], checkpoint_every=args.checkpoint_every,
        preview_every=args.preview_every, resume=args.resume, dtype=args.dtype, progress=not args.no_progress,
        num_threads=args.threads, device=str(runtime_from_args(args)[0]), slice_axis=args.slice_axis,
    )
    print(f"wrote {folder} (load with: --backbone timm:{args.arch} --weights {folder})")
    return 0
