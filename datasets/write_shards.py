"""Write the items of the dataset a gin configuration trains on into a shard set (`sprint_mm.data.shards`).

    python datasets/write_shards.py data/moving_digits_shards --gin-file gin/video/moving_digits_stage1.gin \
        [--gin-param ...] [--shard-size 256M | --items-per-shard N] [--shard i --num-shards n] [--dtype float16]

The flags `--gin-file` and `--gin-param` are train.py's: the dataset is the one bound to `Trainer.dataset`, so the
command that trains from the source data writes its shards. Then train from them with
`--gin-param 'Trainer.dataset = @ShardDataset()' --gin-param "ShardDataset.root = 'OUT'"`.

Rerunning the same command resumes (finished shards are kept); n writers started with `--shard 0..n-1
--num-shards n` (on any machines sharing OUT) split the shards between them, and the last to finish writes the index
and the manifest. A corrupt source item is skipped with one line here and in OUT/bad_items.jsonl, and counted.
"""
import sys

from sprint_mm.cli import write_shards_main

if __name__ == "__main__":
    sys.exit(write_shards_main())
