"""BucketBatchSampler: per-epoch plans, sharding, weights, exact resume on any process count, clear errors."""
from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from sprint_mm.data.bucket_sampler import BucketBatchSampler
from sprint_mm.data.buckets import BucketTable

TABLE = BucketTable([(1, 16, 16, 8), (1, 8, 16, 4), (4, 16, 16, 4), (8, 16, 16, 8)])


def assignment(counts: list[int], unassigned: int = 3, seed: int = 0) -> list:
    """bucket_of with counts[b] items in bucket b and some items in no bucket, shuffled."""
    bucket_of = [bucket for bucket, count in enumerate(counts) for _ in range(count)] + [None] * unassigned
    random.Random(seed).shuffle(bucket_of)
    return bucket_of


BUCKET_OF = assignment([37, 22, 13, 17])


def take(sampler: BucketBatchSampler, count: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), count))


def test_plan_is_a_pure_function_of_seed_and_epoch_and_differs_across_epochs():
    first, second = BucketBatchSampler(BUCKET_OF, TABLE, seed=3), BucketBatchSampler(BUCKET_OF, TABLE, seed=3)
    assert first.epoch_plan(5) == second.epoch_plan(5)
    assert first.epoch_plan(0) != first.epoch_plan(1)
    assert first.epoch_plan(0) != BucketBatchSampler(BUCKET_OF, TABLE, seed=4).epoch_plan(0)
    # Not only the batch order: the bucket contents and the items that sit out change too.
    assert {tuple(items) for _, items in first.epoch_plan(0).batches} != \
        {tuple(items) for _, items in first.epoch_plan(1).batches}
    assert set(first.epoch_plan(0).left_out) != set(first.epoch_plan(1).left_out)


def test_an_epoch_holds_every_assigned_item_once_in_batches_of_its_bucket():
    sampler = BucketBatchSampler(BUCKET_OF, TABLE, seed=1)
    for epoch in range(4):
        plan = sampler.epoch_plan(epoch)
        trained = [item for _, items in plan.batches for item in items]
        assigned = [index for index, bucket in enumerate(BUCKET_OF) if bucket is not None]
        assert sorted(trained + plan.left_out) == assigned  # each once: nothing repeated, nothing lost
        for bucket, items in plan.batches:
            assert len(items) == TABLE[bucket].batch_size
            assert all(BUCKET_OF[item] == bucket for item in items)
        left = Counter(BUCKET_OF[item] for item in plan.left_out)
        assert all(left[bucket] < TABLE[bucket].batch_size for bucket in left)
        assert left == {0: 37 % 8, 1: 22 % 4, 2: 13 % 4, 3: 17 % 8}
        assert len(plan.batches) == sampler.per_epoch == 37 // 8 + 22 // 4 + 13 // 4 + 17 // 8
    # Buckets are interleaved, not run one after another.
    order = [bucket for bucket, _ in sampler.epoch_plan(0).batches]
    assert order != sorted(order)


def test_weights_set_the_batches_per_bucket():
    table = BucketTable([(1, 16, 16, 4, 2.0), (1, 8, 16, 4, 0.5), (4, 16, 16, 2, 1.5)])
    bucket_of = assignment([10, 20, 9])
    sampler = BucketBatchSampler(bucket_of, table, seed=2)
    for epoch in range(3):
        plan = sampler.epoch_plan(epoch)
        per_bucket = Counter(bucket for bucket, _ in plan.batches)
        assert per_bucket == {0: 20 // 4, 1: 10 // 4, 2: round(13.5) // 2}
        uses = Counter(item for _, items in plan.batches for item in items) + Counter(plan.left_out)
        # weight 2: every item exactly twice; weight 0.5: 10 of the 20 items once; weight 1.5: 9 once, 5 twice
        assert {uses[item] for item in range(len(bucket_of)) if bucket_of[item] == 0} == {2}
        half = [item for item in uses if bucket_of[item] == 1]
        assert len(half) == 10 and all(uses[item] == 1 for item in half)
        assert sorted(uses[item] for item in uses if bucket_of[item] == 2) == [1] * 4 + [2] * 5
    halves = [{item for _, items in sampler.epoch_plan(epoch).batches for item in items if bucket_of[item] == 1}
              for epoch in range(3)]
    assert halves[0] != halves[1]  # a different random half each epoch


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_reads_the_same_bucket_at_every_step_and_the_shares_make_the_global_batch(world_size):
    reference = BucketBatchSampler(BUCKET_OF, TABLE, seed=5)
    steps = 3 * reference.per_epoch + 2  # across epoch boundaries
    ranks = [take(BucketBatchSampler(BUCKET_OF, TABLE, seed=5, rank=rank, world_size=world_size), steps)
             for rank in range(world_size)]
    for step in range(steps):
        buckets = {BUCKET_OF[item] for rank in ranks for item in rank[step]}
        assert buckets == {reference.bucket_at(step)}
        assert [item for rank in ranks for item in rank[step]] == reference.global_batch(step)[1]


def test_grad_accum_splits_the_share_in_order_and_resume_on_other_process_counts_is_exact():
    """The union of the ranks' micro-batches per global batch is the same list on 1, 2 and 4 processes with any
    accumulation, from any start: a run resumes on another process count exactly."""
    start, steps = 11, 9
    unions = []
    for world_size, grad_accum in ((1, 1), (1, 4), (2, 1), (2, 2), (4, 1)):
        per_rank = [take(BucketBatchSampler(BUCKET_OF, TABLE, seed=7, rank=rank, world_size=world_size,
                                            grad_accum=grad_accum, start=start), steps * grad_accum)
                    for rank in range(world_size)]
        union = [[item for rank in per_rank for micro in rank[step * grad_accum:(step + 1) * grad_accum]
                  for item in micro] for step in range(steps)]
        unions.append(union)
        sizes = {len(micro) for rank in per_rank for micro in rank}
        expected = {TABLE[bucket].batch_size // (world_size * grad_accum) for bucket in range(len(TABLE))}
        assert sizes <= expected
    assert all(union == unions[0] for union in unions)


def test_resume_from_start_equals_skipping_that_many_global_batches():
    fresh = take(BucketBatchSampler(BUCKET_OF, TABLE, seed=9, world_size=2, rank=1, grad_accum=2), 2 * 40)
    for start in (0, 7, 16, 33):
        resumed = take(BucketBatchSampler(BUCKET_OF, TABLE, seed=9, world_size=2, rank=1, grad_accum=2,
                                          start=start), 2 * 5)
        assert resumed == fresh[2 * start:2 * start + 10]


def test_bucket_sizes_that_do_not_split_over_processes_are_refused():
    with pytest.raises(ValueError, match=r"bucket 1 1x8x16 \(batch 4\): its batch_size 4 does not split over 4 "
                                         r"process\(es\) x 2 accumulation step\(s\) = 8"):
        BucketBatchSampler(BUCKET_OF, TABLE, world_size=4, grad_accum=2)


def test_a_bucket_that_never_fills_a_batch_is_named():
    table = BucketTable([(1, 16, 16, 8), (4, 16, 16, 16, 0.5)])
    with pytest.raises(ValueError, match=r"never train: bucket 1 4x16x16 \(batch 16, weight 0.5\) has 20 item\(s\), "
                                         r"10 slot\(s\) per epoch; .*smaller batch_size, a higher weight, or remove"):
        BucketBatchSampler(assignment([30, 20]), table)


def test_an_epoch_without_batches_says_which_buckets_are_short():
    table = BucketTable([(1, 16, 16, 64), (4, 16, 16, 32)])
    with pytest.raises(ValueError, match=r"zero batches: .*bucket 0 1x16x16 \(batch 64\) has 30 item\(s\).*bucket 1 "
                                         r"4x16x16 \(batch 32\) has 20 item\(s\).*or add data"):
        BucketBatchSampler(assignment([30, 20]), table)


def test_an_empty_bucket_is_fine_but_no_assigned_item_at_all_is_an_error():
    sampler = BucketBatchSampler(assignment([16, 0]), BucketTable([(1, 16, 16, 8), (4, 16, 16, 8)]))
    assert {sampler.bucket_at(step) for step in range(10)} == {0}
    with pytest.raises(ValueError, match=r"no item of the 5 fits a bucket of the table"):
        BucketBatchSampler([None] * 5, TABLE)
    with pytest.raises(ValueError, match=r"item 2 is assigned to bucket 4, but the table has buckets 0..3"):
        BucketBatchSampler([0, 1, 4], TABLE)
    with pytest.raises(ValueError, match=r"rank 2 must lie in \[0, 2\)"):
        BucketBatchSampler(BUCKET_OF, TABLE, rank=2, world_size=2)


def test_fingerprint_lets_an_unchanged_run_resume_and_names_what_changed():
    sampler = BucketBatchSampler(BUCKET_OF, TABLE, seed=1)
    saved = sampler.fingerprint()
    # Same data and table on another process count: resumable (the fingerprint does not depend on the split).
    BucketBatchSampler(BUCKET_OF, TABLE, seed=1, world_size=4, rank=3).check_resumable(saved)
    added = BucketBatchSampler(BUCKET_OF + [0], TABLE)
    with pytest.raises(ValueError, match=r"the dataset changed since this run's checkpoint: it had 92 items, "
                                         r"\[37, 22, 13, 17\] per bucket, now 93, \[38, 22, 13, 17\]; resuming would "
                                         r"read other items at this position; .*Trainer.init_from = <old run>"):
        added.check_resumable(saved)
    swapped = list(BUCKET_OF)
    first, second = swapped.index(0), swapped.index(1)
    swapped[first], swapped[second] = 1, 0
    with pytest.raises(ValueError, match=r"same counts, other items"):
        BucketBatchSampler(swapped, TABLE).check_resumable(saved)
    retabled = BucketTable([(1, 16, 16, 8), (1, 8, 16, 4), (4, 16, 16, 4), (8, 16, 16, 4)])
    with pytest.raises(ValueError, match=r"the bucket table changed since this run's checkpoint"):
        BucketBatchSampler(BUCKET_OF, retabled).check_resumable(saved)
    with pytest.raises(ValueError, match=r"was not written by BucketBatchSampler.fingerprint"):
        sampler.check_resumable({"items": 92})
