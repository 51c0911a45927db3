"""``fqdetr data``: make the built-in dataset, or print statistics of a COCO json."""
import json
import logging
import time

log = logging.getLogger(__name__)


def add_parser(subparsers):
    p = subparsers.add_parser("data", help="built-in dataset: generate it, or show statistics")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    make = sub.add_parser("make", help="generate the built-in shapes dataset in COCO format")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--num-train", type=int, default=2000, help="training images (default 2000)")
    make.add_argument("--num-val", type=int, default=500, help="validation images (default 500)")
    make.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    make.add_argument("--image-size", type=int, default=128,
                      help="shortest possible image side in pixels; sides vary up to 1.25x (default 128)")
    make.add_argument("--categories-per-group", type=int, choices=(4, 8), default=4,
                      help="categories in each of the 4 supercategories: 4 (16 categories) or 8 "
                           "(32, for finding 5 of docs/METHOD.md section 6: gains vs the number "
                           "of classes) (default 4)")
    make.add_argument("--no-progress", action="store_true", help="no progress bar")
    make.set_defaults(func=run_make)
    stats = sub.add_parser("stats", help="per-category / supercategory / size counts of a COCO json")
    stats.add_argument("ann_file", help="COCO instances json")
    stats.set_defaults(func=run_stats)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_make(args):
    from fqdetr.data.synthetic import make_builtin_dataset

    start = time.perf_counter()
    out = make_builtin_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                               image_size=args.image_size, seed=args.seed,
                               progress=not args.no_progress,
                               categories_per_group=args.categories_per_group)
    log.info("built-in dataset written to %s in %.1f s", args.out, time.perf_counter() - start)
    for split, info in out.items():
        print(f"{split}: {info['num_images']} images, {info['num_annotations']} boxes\n"
              f"  images: {info['img_folder']}\n  annotations: {info['ann_file']}")
    return 0


def run_stats(args):
    from fqdetr.data.coco import load_coco
    from fqdetr.data.synthetic import dataset_stats

    print(json.dumps(dataset_stats(load_coco(args.ann_file).dataset), indent=2))
    return 0
