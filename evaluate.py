"""Frechet distance (FID / FDD / FVD-style proxy) of generated samples against a reference.

    python evaluate.py --samples S.npz --reference REF.npz --metric fid --weights inception_v3.pth --out fid.json
    python evaluate.py --samples train.npz --metric fdd --weights dinov2-large/ --write-reference ref_fdd.npz

Samples: an ``.npz`` with ``arr_0`` uint8 (N, H, W, 3) or (N, T, H, W, 3) (ADM layout) or a folder of PNGs. The
reference: statistics (``mu``/``sigma`` ``.npz``) or samples. Weights are local only. All logic lives in
``sprint_mm.evaluation``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sprint_mm.evaluation import (
    FRAME_KINDS,
    METRIC_EXTRACTORS,
    FeatureStats,
    build_extractor,
    evaluate,
    extractor_kind,
    format_result,
    is_stats_file,
    open_samples,
    require_npz,
    write_reference_stats,
)
from sprint_mm.errors import check_number, check_writable_folder, report_mistakes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help="samples .npz (arr_0) or folder of PNGs")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--reference", help="reference statistics .npz (mu, sigma) or reference samples")
    mode.add_argument("--write-reference", metavar="OUT.npz", help="write the samples' statistics here instead")
    parser.add_argument("--metric", required=True, choices=sorted(METRIC_EXTRACTORS))
    parser.add_argument("--weights", required=True, help="Inception state dict file (fid) or DINOv2 folder (fdd)")
    parser.add_argument(
        "--frame-features", default="inception", choices=FRAME_KINDS, help="frame network for fvd"
    )
    parser.add_argument("--batch-size", type=int, default=50, help="images (or clips, for fvd) per batch")
    parser.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    parser.add_argument("--out", help="write the result as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """0 on success; 2 with one `error: ...` line on stderr for a missing or unfitting file or value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write_reference and args.out:
        parser.error("--out is for evaluation results; with --write-reference the statistics file is the output")
    return report_mistakes(run, args)


def run(args: argparse.Namespace) -> None:
    """Check the samples and the output first (a wrong file fails before any network loads), then compute."""
    check_number("--batch-size", args.batch_size, low=1, integer=True)
    open_samples(args.samples)
    if args.write_reference:
        check_writable_folder(require_npz(args.write_reference).parent, "the folder of --write-reference")
    elif not Path(args.reference).exists():
        raise FileNotFoundError(f"--reference {args.reference!r} does not exist")
    elif is_stats_file(args.reference):
        FeatureStats.load(args.reference)  # statistics holding NaN or inf are refused now
    if args.out:
        check_writable_folder(Path(args.out).parent, "the folder of --out")
    extractor = build_extractor(extractor_kind(args.metric, args.frame_features), args.weights, args.device)
    if args.write_reference:
        stats = write_reference_stats(args.samples, extractor, args.write_reference, args.batch_size)
        print(f"wrote statistics of {stats.count} samples to {args.write_reference} | extractor: {stats.extractor}")
        return
    result = evaluate(args.samples, args.reference, extractor, args.batch_size)
    print(format_result(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
