"""Bucket tables: validation, the assignment rule, batch sizes for a constant token count."""
from __future__ import annotations

import math
import random

import gin
import pytest

from sprint_mm.data.buckets import Bucket, BucketTable, propose_batch_sizes, tokens_per_sample

TABLE = [(1, 16, 16, 8), (1, 12, 20, 8), (1, 20, 12, 8), (4, 16, 16, 4), (4, 12, 20, 4), (8, 16, 16, 2, 0.5)]


def brute_force_assign(table: BucketTable, frames: int, height: int, width: int, crop_only: bool = False):
    """The rule, written as one sort: eligible buckets ordered by (most frames, aspect distance, area distance,
    table order)."""
    ranked = []
    for number, bucket in enumerate(table):
        if bucket.frames > frames or (crop_only and (bucket.height > height or bucket.width > width)):
            continue
        aspect = round(abs(math.log(height / width) - math.log(bucket.height / bucket.width)), 9)
        area = round(abs(math.log(height * width) - math.log(bucket.height * bucket.width)), 9)
        ranked.append((-bucket.frames, aspect, area, number))
    return min(ranked)[3] if ranked else None


def test_table_accepts_tuples_and_buckets_and_keeps_them():
    table = BucketTable([(1, 16, 32, 8), Bucket(4, 16, 16, 4, 2.0), [2, 8, 8, 2, 0.5]])
    assert [bucket.shape for bucket in table] == [(1, 16, 32), (4, 16, 16), (2, 8, 8)]
    assert [bucket.batch_size for bucket in table] == [8, 4, 2]
    assert [bucket.weight for bucket in table] == [1.0, 2.0, 0.5]
    assert table.to_list() == [[1, 16, 32, 8, 1.0], [4, 16, 16, 4, 2.0], [2, 8, 8, 2, 0.5]]
    assert BucketTable(table.to_list()) == table


def test_table_is_gin_configurable():
    gin.parse_config("BucketTable.buckets = [(1, 16, 16, 8), (4, 8, 16, 4, 2.0)]")
    table = BucketTable()
    assert table.to_list() == [[1, 16, 16, 8, 1.0], [4, 8, 16, 4, 2.0]]


@pytest.mark.parametrize("buckets, message", [
    ([], "non-empty list of buckets"),
    ("1,16,16,8", "non-empty list of buckets"),
    ([(1, 16, 16)], r"bucket 0 must be \(frames, height, width, batch_size\)"),
    ([(1, 16, 16, 8, 1.0, 3)], "bucket 0 must be"),
    ([(1, 16, 16, 8), (0, 16, 16, 8)], "bucket 1: .*frames must be a positive int, got 0"),
    ([(1, -16, 16, 8)], "height must be a positive int, got -16"),
    ([(1, 16, 16.5, 8)], "width must be a positive int, got 16.5"),
    ([(1, 16, 16, 0)], "batch_size must be a positive int, got 0"),
    ([(1, 16, 16, 8, 0)], "weight must be a finite number > 0, got 0"),
    ([(1, 16, 16, 8, float("nan"))], "weight must be a finite number > 0"),
    ([(1, 16, 16, 8), (2, 8, 8, 4), (1, 16, 16, 4)], "buckets 0 and 2 have the same size 1x16x16"),
])
def test_bad_tables_get_one_clear_error(buckets, message):
    with pytest.raises(ValueError, match=message):
        BucketTable(buckets)


def test_assignment_matches_brute_force_over_random_tables_and_sizes():
    rng = random.Random(0)
    for _ in range(200):
        shapes = {(rng.choice([1, 1, 2, 4, 8]), rng.choice([8, 12, 16, 24, 32]), rng.choice([8, 12, 16, 24, 32]))
                  for _ in range(rng.randint(1, 8))}
        table = BucketTable([(*shape, 4) for shape in shapes])
        for _ in range(25):
            size = (rng.choice([1, 1, 2, 3, 4, 6, 9, 30]), rng.randint(4, 400), rng.randint(4, 400))
            for crop_only in (False, True):
                assert table.assign(*size, crop_only=crop_only) == brute_force_assign(table, *size, crop_only)


def test_assignment_rule_on_chosen_cases():
    table = BucketTable(TABLE)
    assert table.assign(1, 100, 100) == 0  # an image: square 1-frame bucket
    assert table.assign(1, 60, 100) == 1  # wide image: the wide 1-frame bucket, never a video bucket
    assert table.assign(1, 100, 60) == 2
    assert table.assign(5, 60, 100) == 4  # 5 frames: the 4-frame buckets, the wide one
    assert table.assign(8, 60, 100) == 5  # 8 frames: the only 8-frame bucket, whatever its aspect
    assert table.assign(3, 16, 16) == 0  # shorter than every video bucket: a 1-frame bucket takes a frame
    videos_only = BucketTable([(4, 16, 16, 4), (8, 16, 16, 2)])
    assert videos_only.assign(3, 16, 16) is None  # a 3-frame clip when every bucket needs 4+
    assert videos_only.assign(1, 16, 16) is None  # an image and no 1-frame bucket
    # Equal aspect distance: the nearer area wins; equal in both: the earlier bucket.
    sizes = BucketTable([(1, 8, 8, 4), (1, 32, 32, 4)])
    assert sizes.assign(1, 12, 12) == 0 and sizes.assign(1, 20, 20) == 1 and sizes.assign(1, 16, 16) == 0
    mirrored = BucketTable([(1, 16, 32, 4), (1, 32, 16, 4)])
    assert mirrored.assign(1, 20, 20) == 0


def test_crop_only_never_assigns_a_bucket_larger_than_the_item():
    table = BucketTable([(1, 16, 16, 4), (1, 32, 32, 4), (1, 16, 32, 4)])
    assert table.assign(1, 30, 30) == 1
    assert table.assign(1, 30, 30, crop_only=True) == 0  # 32x32 would need a resize
    assert table.assign(1, 20, 40, crop_only=True) == 2
    assert table.assign(1, 12, 40, crop_only=True) is None  # smaller than every bucket in height


def test_tokens_per_sample_and_batch_size_proposal_match_a_direct_computation():
    shapes = [(1, 16, 16), (1, 32, 16), (5, 16, 16), (8, 32, 32), (17, 64, 48)]
    patch = (4, 8, 8)
    tokens = [math.ceil(t / 4) * (h // 8) * (w // 8) for t, h, w in shapes]
    assert [tokens_per_sample(shape, patch) for shape in shapes] == tokens == [4, 8, 8, 32, 240]
    for target in (64, 1000, 4096):
        for multiple in (1, 2, 8):
            expected = [max(multiple, multiple * round(target / count / multiple)) for count in tokens]
            got = propose_batch_sizes(shapes, target, patch, multiple_of=multiple)
            assert got == expected
            assert all(size % multiple == 0 and size >= multiple for size in got)
    # An int patch is (1, p, p): every frame is its own token row.
    assert tokens_per_sample((3, 16, 16), 2) == 3 * 8 * 8
    # Above the floor, each proposal is within half a multiple of the exact batch.
    for shape, size in zip(shapes, propose_batch_sizes(shapes, 4096, patch, multiple_of=2)):
        exact = 4096 / tokens_per_sample(shape, patch)
        assert size == 2 or abs(size - exact) <= 1


def test_a_patch_pair_is_height_and_width_with_temporal_patch_one_as_in_the_dit():
    assert tokens_per_sample((3, 16, 16), (2, 4)) == 3 * 8 * 4


@pytest.mark.parametrize("call, message", [
    (lambda: tokens_per_sample((1, 18, 16), 4), "1x18x16 sample does not split into 4x4 patches"),
    (lambda: tokens_per_sample((1, 16, 16), (2, 2, 2, 2)), r"patch_size must be a positive int, an \(H, W\) pair"),
    (lambda: tokens_per_sample((1, 16, 16), (1, 0, 2)), r"patch_size must be a positive int, an \(H, W\) pair"),
    (lambda: propose_batch_sizes([(1, 16, 16)], 0, 2), "tokens_per_step must be a positive int, got 0"),
    (lambda: propose_batch_sizes([(1, 16, 16)], 64, 2, multiple_of=0), "multiple_of must be a positive int"),
])
def test_bad_proposal_arguments_get_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_describe_states_the_per_process_micro_batch():
    text = BucketTable([(1, 16, 16, 32), (4, 16, 16, 8, 2.0)]).describe(world_size=4, grad_accum=2)
    assert text.splitlines() == [
        "bucket 0: 1x16x16 (batch 32), micro-batch 4 per process (4 process(es) x 2 accumulation step(s))",
        "bucket 1: 4x16x16 (batch 8, weight 2), micro-batch 1 per process (4 process(es) x 2 accumulation step(s))",
    ]
