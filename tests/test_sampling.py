"""GroupedBatchSampler and RankShard: whole groups per batch, determinism, resume, weighted mixtures, rank shares."""
import random

import numpy as np
import pytest

from fuselip_med.data.sampling import GroupedBatchSampler, RankShard, _pack, mixture_group_weights, shard_of_batch


def random_groups(num_groups=300, max_size=9, seed=0, start=0):
    rng = random.Random(seed)
    groups, next_index = [], start
    for _ in range(num_groups):
        size = rng.randint(1, max_size)
        groups.append(list(range(next_index, next_index + size)))
        next_index += size
    rng.shuffle(groups)  # group order in the list is unrelated to index order
    return groups


def group_of(groups):
    return {i: g for g, members in enumerate(groups) for i in members}


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_batch_holds_complete_groups_and_each_index_once():
    groups = random_groups()
    sampler = GroupedBatchSampler(groups, 16, seed=3)
    owner = group_of(groups)
    batches = list(sampler)
    assert len(batches) == len(sampler.__class__(groups, 16, seed=3))
    seen = [i for batch in batches for i in batch]
    assert sorted(seen) == sorted(owner)  # every index exactly once
    for batch in batches:
        assert len(batch) <= 16
        for g in {owner[i] for i in batch}:
            assert set(groups[g]) <= set(batch)  # the whole group is there
            members = [i for i in batch if owner[i] == g]
            assert members == groups[g]  # contiguous, in the group's order
    # first-fit fills batches: all but the last few are full or within one small group of full
    sizes = [len(b) for b in batches]
    assert np.mean(sizes[:-1]) > 15.5, sizes


def test_group_larger_than_batch_is_rejected():
    with pytest.raises(ValueError, match="17 samples"):
        GroupedBatchSampler([[0], list(range(1, 18))], 16)


def test_same_seed_same_order_different_seed_different():
    groups = random_groups()
    first = list(GroupedBatchSampler(groups, 16, seed=1))
    again = list(GroupedBatchSampler(groups, 16, seed=1))
    other = list(GroupedBatchSampler(groups, 16, seed=2))
    assert first == again
    assert first != other


def test_epochs_differ_and_set_epoch_is_deterministic():
    groups = random_groups()
    sampler = GroupedBatchSampler(groups, 16, seed=0)
    e0, e1 = epoch_batches(sampler, 0), epoch_batches(sampler, 1)
    assert e0 != e1
    assert epoch_batches(GroupedBatchSampler(groups, 16, seed=0), 1) == e1
    # iterating again without set_epoch moves on to the next epoch by itself
    fresh = GroupedBatchSampler(groups, 16, seed=0)
    assert list(fresh) == e0 and list(fresh) == e1


@pytest.mark.parametrize("k", [0, 1, 7])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(k):
    groups = random_groups()
    reference = GroupedBatchSampler(groups, 16, seed=5)
    full = [epoch_batches(reference, e) for e in range(3)]

    sampler = GroupedBatchSampler(groups, 16, seed=5)
    sampler.set_epoch(1)
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(k)]
    state = sampler.state_dict()
    samples = sum(map(len, taken))
    assert state == {"seed": 5, "epoch": 1, "samples_done": samples, "segments": [[16, k]] if k else []}

    resumed = GroupedBatchSampler(groups, 16, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert len(resumed) == len(full[1]) - k
    resumed.set_epoch(1)  # a resumed trainer calls set_epoch(start_epoch) as usual: position is kept
    rest = list(resumed)
    assert taken + rest == full[1]
    assert epoch_batches(resumed, 2) == full[2]


def test_state_of_a_finished_epoch_is_the_start_of_the_next():
    groups = random_groups()
    sampler = GroupedBatchSampler(groups, 16, seed=5)
    list(sampler)
    assert sampler.state_dict() == {"seed": 5, "epoch": 1, "samples_done": 0, "segments": []}
    # a DataLoader prefetching ahead: the loop consumed only 3 batches
    three = sum(map(len, epoch_batches(GroupedBatchSampler(groups, 16, seed=5), 0)[:3]))
    assert sampler.state_dict(batches_done=3) == {"seed": 5, "epoch": 0, "samples_done": three, "segments": [[16, 3]]}
    resumed = GroupedBatchSampler(groups, 16)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == epoch_batches(GroupedBatchSampler(groups, 16, seed=5), 1)


def test_no_shuffle_packs_groups_first_fit_in_order():
    groups = [[0, 1], [2], [3, 4, 5], [6], [7, 8]]
    # [3, 4, 5] does not fit after [0, 1], [2]: it waits for the next batch and [6] fills the gap
    assert list(GroupedBatchSampler(groups, 4, shuffle=False)) == [[0, 1, 2, 6], [3, 4, 5], [7, 8]]


def test_drop_last_drops_a_short_final_batch():
    groups = [[i] for i in range(10)]
    assert [len(b) for b in GroupedBatchSampler(groups, 4, drop_last=False)] == [4, 4, 2]
    sampler = GroupedBatchSampler(groups, 4, drop_last=True)
    assert [len(b) for b in sampler] == [4, 4]
    assert len(GroupedBatchSampler(groups, 4, drop_last=True)) == 2


def test_singleton_fast_path_matches_general_packing():
    groups = [[i] for i in range(103)]
    sampler = GroupedBatchSampler(groups, 16, seed=4)
    rng = np.random.default_rng([4, 0])
    order, bounds = _pack(iter(rng.permutation(103).tolist()), [1] * 103, 16, 64, None)
    expected = [order[bounds[b]:bounds[b + 1]].tolist() for b in range(len(bounds) - 1)]
    assert list(sampler) == expected


def test_epoch_length_fixes_the_number_of_batches_and_cycles():
    groups = random_groups(num_groups=20)
    sampler = GroupedBatchSampler(groups, 16, seed=0, epoch_length=50)
    batches = list(sampler)
    assert len(batches) == 50 == len(GroupedBatchSampler(groups, 16, seed=0, epoch_length=50))
    owner = group_of(groups)
    for batch in batches:
        assert len(batch) == len(set(batch))  # a repeated group never lands twice in one batch
        for g in {owner[i] for i in batch}:
            assert [i for i in batch if owner[i] == g] == groups[g]
    singles = list(GroupedBatchSampler([[i] for i in range(10)], 4, seed=0, epoch_length=9))
    assert len(singles) == 9 and all(len(b) == 4 == len(set(b)) for b in singles)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_split_each_global_batch_into_contiguous_whole_groups(world):
    groups = random_groups(num_groups=301)
    owner = group_of(groups)
    numbers = np.empty(max(owner) + 1, dtype=np.int64)
    for index, g in owner.items():
        numbers[index] = g
    single = list(GroupedBatchSampler(groups, 16, seed=9))
    per_rank = [list(RankShard(GroupedBatchSampler(groups, 16, seed=9), numbers, r, world)) for r in range(world)]
    assert all(len(shares) == len(single) for shares in per_rank)  # every rank takes every step
    for step, batch in enumerate(single):
        shares = [per_rank[r][step] for r in range(world)]
        assert [i for share in shares for i in share] == batch  # contiguous shares, in rank order, cover it
        for share in shares:
            for g in {owner[i] for i in share}:
                assert set(groups[g]) <= set(share)  # groups are never split across ranks
    assert shard_of_batch(single[0], numbers, 0, 1) == single[0]
    assert len(RankShard(GroupedBatchSampler(groups, 16, seed=9), numbers, 1, world)) == len(single)


class _FakeMixture:
    """What mixture_group_weights reads from a MixtureDataset (the real one is tested in test_collate_dataset)."""

    def __init__(self, per_dataset_groups, weights):
        self.weights = weights
        self._groups = per_dataset_groups

    def dataset_groups(self):
        return self._groups

    def groups(self):
        return [g for groups in self._groups for g in groups]


def test_mixture_weights_give_sample_proportions():
    big = random_groups(num_groups=400, max_size=9, seed=1)                          # ~2000 samples
    n_big = sum(len(g) for g in big)
    small = random_groups(num_groups=50, max_size=3, seed=2, start=n_big)            # ~100 samples
    mixture = _FakeMixture([big, small], [1.0, 3.0])
    weights = mixture_group_weights(mixture)
    sampler = GroupedBatchSampler(mixture.groups(), 16, seed=0, group_weights=weights, epoch_length=500)
    from_small = total = 0
    for batch in sampler:
        total += len(batch)
        from_small += sum(i >= n_big for i in batch)
        assert len(batch) <= 16 and len(set(batch)) == len(batch)
    assert total > 7000
    assert from_small / total == pytest.approx(0.75, abs=0.03)
    # equal weights: proportions follow the weights, not the dataset sizes
    sampler = GroupedBatchSampler(mixture.groups(), 16, seed=0, epoch_length=300,
                                  group_weights=mixture_group_weights(_FakeMixture([big, small], [1.0, 1.0])))
    batches = list(sampler)
    share = sum(i >= n_big for b in batches for i in b) / sum(len(b) for b in batches)
    assert share == pytest.approx(0.5, abs=0.04)


def test_weighted_sampling_is_deterministic_and_resumable():
    groups = random_groups()
    weights = [1.0 + (i % 3) for i in range(len(groups))]
    make = lambda: GroupedBatchSampler(groups, 16, seed=2, group_weights=weights)  # noqa: E731
    full = list(make())
    assert full == list(make())
    sampler = make()
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(sampler.state_dict())
    assert head + list(resumed) == full


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="group_weights"):
        GroupedBatchSampler([[0], [1]], 2, group_weights=[1.0])
    with pytest.raises(ValueError, match="shuffle"):
        GroupedBatchSampler([[0], [1]], 2, group_weights=[1.0, 1.0], shuffle=False)
    with pytest.raises(ValueError, match="rank"):
        RankShard(GroupedBatchSampler([[0], [1]], 2), np.arange(2), rank=2, world=2)
    with pytest.raises(ValueError, match="empty"):
        GroupedBatchSampler([], 2)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("taken", [1, 3])
def test_resume_with_another_batch_size_draws_every_sample_once_per_epoch(grouped, taken):
    """Batch size 8 -> 16 (and back to 8) mid-epoch: the epoch still draws each sample exactly once; the next
    epoch is the uninterrupted run's at the new size."""
    groups = random_groups(60, max_size=4) if grouped else [[i] for i in range(100)]
    n = sum(map(len, groups))
    small = GroupedBatchSampler(groups, 8, seed=3)
    iterator = iter(small)
    drawn = [i for _ in range(taken) for i in next(iterator)]
    state = small.state_dict()
    assert state["samples_done"] == len(drawn)
    bigger = GroupedBatchSampler(groups, 16, seed=3)
    bigger.load_state_dict(state)
    iterator = iter(bigger)
    batches = [next(iterator) for _ in range(2)]
    assert all(len(b) <= 16 for b in batches) and max(map(len, batches)) > 8
    drawn += [i for b in batches for i in b]
    again = GroupedBatchSampler(groups, 8, seed=3)  # and a second change, back to 8
    again.load_state_dict(bigger.state_dict())
    assert again.state_dict()["samples_done"] == len(drawn)
    drawn += [i for b in again for i in b]
    assert sorted(drawn) == list(range(n))  # every sample exactly once in the epoch
    assert again.state_dict() == {"seed": 3, "epoch": 1, "samples_done": 0, "segments": []}
    assert epoch_batches(again, 1) == epoch_batches(GroupedBatchSampler(groups, 8, seed=3), 1)


def test_a_batch_size_change_a_weighted_stream_cannot_honour_is_refused_naming_the_setting():
    from fuselip_med.data.sampling import SamplerResumeError

    groups = random_groups()
    weights = [1.0 + (i % 3) for i in range(len(groups))]
    sampler = GroupedBatchSampler(groups, 16, seed=2, group_weights=weights)
    next(iter(sampler))
    other = GroupedBatchSampler(groups, 32, seed=2, group_weights=weights)
    with pytest.raises(SamplerResumeError, match=r"train\.batch_size=16"):
        other.load_state_dict(sampler.state_dict())


def test_resume_from_one_process_to_two_draws_every_sample_once_per_epoch():

    groups = random_groups(60, max_size=4)
    group_of = np.zeros(sum(map(len, groups)), dtype=np.int64)
    for number, group in enumerate(groups):
        group_of[group] = number
    one = GroupedBatchSampler(groups, 8, seed=4)
    iterator = iter(RankShard(one, group_of, 0, 1))
    drawn = [i for _ in range(3) for i in next(iterator)]
    state = one.state_dict()
    for rank in (0, 1):  # each process of the resumed run, batch size 16 now
        sampler = GroupedBatchSampler(groups, 16, seed=4)
        sampler.load_state_dict(state)
        drawn += [i for share in RankShard(sampler, group_of, rank, 2) for i in share]
    assert sorted(drawn) == list(range(len(group_of)))
