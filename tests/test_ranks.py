"""What each torchrun rank decides for itself and what the ranks agree on: the data-loader workers'
seeds, their number, and the checkpoint --resume continues from."""
import pytest
import torch

import data_utils
import train
from conftest import on_two_ranks
from utils import flatten_split


@pytest.mark.parametrize('cpus,local_ranks,workers', [
    (range(2), 1, 2),  # this machine: as min(8, cpu_count) was
    (range(64), 1, 8),  # at most 8
    (range(16), 4, 4),  # four GPUs of a node share its CPUs
    (range(64), 8, 8),
    ({0, 1, 2}, 2, 1),  # a job scheduler's share of the machine (taskset, cgroups)
    (range(2), 4, 0),  # more ranks than CPUs: each loads in its own process
])
def test_num_workers_default_is_this_processs_share_of_its_cpus(cpus, local_ranks, workers):
    assert train.default_num_workers(cpus, local_ranks) == workers


def test_an_explicit_num_workers_is_kept_and_leaves_the_run_name_alone():
    default = train.parse_args([])
    explicit = train.parse_args(['--num_workers', str(default.num_workers + 3)])
    assert explicit.num_workers == default.num_workers + 3
    assert explicit.run_name == default.run_name


def test_rank_0_seeds_its_epochs_as_a_single_process_always_has_and_every_rank_draws_its_own():
    """Rank 0 has the seeds of every run before ranks had their own, so single-process runs are
    unchanged; every (epoch, rank) starts torch's generator elsewhere (it keeps 32 bits of a seed)."""
    assert [train.epoch_seed(3, epoch) for epoch in range(3)] == [3 * 1_000_003 + epoch for epoch in range(3)]
    def first_draw(seed):
        return torch.randint(2 ** 62, (1,), generator=torch.Generator().manual_seed(seed)).item()
    draws = {first_draw(train.epoch_seed(3, epoch, rank)) for epoch in range(100) for rank in (0, 1, 7, 4095)}
    assert len(draws) == 400

# -----------------------------------------------------------------------------
# two gloo processes


def draw(image):
    """A transform that shows what the worker's generator draws (torchvision's random crops and
    flips draw from it too)."""
    return torch.rand(2)


def training_loader(data_path, rank=0, world_size=1):
    """A rank's training loader of the synthetic set, as train.py builds it (seed 4, batch 10), its
    transform drawing instead of augmenting, with one worker; and the run's arguments."""
    args = train.parse_args(['--data_path', data_path, '--data_name', 'synthetic', '--batch_size', '10',
                             '--num_workers', '1', '--device', 'cpu', '--seed', '4'])
    split = data_utils.load_splits(data_path, 'synthetic')['train']
    return train.build_loader(*flatten_split(split, sorted(split)), draw, True, args, torch.device('cpu'), rank,
                              world_size), args


def epoch_draws(loader, seed, epoch, rank):
    train.start_epoch(loader, seed, epoch, rank)
    return torch.cat([drawn for drawn, _ in loader]).flatten()


def rank_draws(rank, data_path):
    """Epochs 1 and 2 of one rank's training loader, with one worker; then epoch 2 again in a
    loader built afresh, after other draws, as a run resumed after epoch 1 builds and runs it."""
    loader, args = training_loader(data_path, rank, world_size=2)
    uninterrupted = [epoch_draws(loader, args.seed, epoch, rank) for epoch in (1, 2)]
    torch.rand(100)  # what the resumed process draws before its first epoch (building the network)
    resumed_loader, _ = training_loader(data_path, rank, world_size=2)
    return uninterrupted, epoch_draws(resumed_loader, args.seed, 2, rank)


@pytest.mark.slow
def test_each_rank_s_workers_draw_their_own_numbers_and_draw_them_again_after_a_resume(small_synthetic, tmp_path):
    ranks = on_two_ranks(rank_draws, tmp_path, small_synthetic)
    for epoch in (0, 1):
        assert not set(ranks[0][0][epoch].tolist()) & set(ranks[1][0][epoch].tolist())
    for rank, (uninterrupted, resumed) in ranks.items():
        assert torch.equal(resumed, uninterrupted[1]), rank
    # rank 0's worker draws what a single process's worker draws: the same stream, in smaller batches
    loader, args = training_loader(small_synthetic)
    alone = epoch_draws(loader, args.seed, 1, rank=0)
    assert torch.equal(ranks[0][0][0], alone[:len(ranks[0][0][0])])


def resume_arguments(output_dir, *flags):
    return train.parse_args(['--data_name', 'synthetic', '--backbone_type', 'resnet18', '--output_dir', output_dir,
                             '--resume', 'auto', *flags])


def rank_resumes(rank, output_dir):
    """checkpoint_to_resume on one rank, where each rank sees another disk (no shared file system):
    (what it decides where only rank 1 lacks the checkpoint, where only rank 0 lacks it, and where
    both can read it but rank 1's arguments chose another name and precision, as parse_args does
    where a disk holds the run under its older name)."""
    args = resume_arguments(output_dir)
    path = train.checkpoint_path(args)
    try:
        train.checkpoint_to_resume(args, rank, 2, readable=lambda p: rank == 0 and p == path)
        rank_1_lacks = 'resumed'
    except FileNotFoundError as e:
        rank_1_lacks = str(e)
    rank_0_lacks = train.checkpoint_to_resume(resume_arguments(output_dir), rank, 2,
                                              readable=lambda p: rank == 1 and p == path)
    mine = resume_arguments(output_dir)
    if rank == 1:
        mine = resume_arguments(output_dir, '--amp', 'none' if mine.amp == 'bf16' else 'bf16', '--lr', '3')
    both_have = train.checkpoint_to_resume(mine, rank, 2, readable=lambda p: p == path)
    return rank_1_lacks, rank_0_lacks, (both_have, mine.run_name, mine.amp)


@pytest.mark.slow
def test_resume_auto_is_decided_on_rank_0_and_a_rank_without_the_checkpoint_stops_every_rank(tmp_path):
    output_dir = str(tmp_path / 'results')
    ranks = on_two_ranks(rank_resumes, tmp_path, output_dir, timeout=120)
    args = resume_arguments(output_dir)
    path = train.checkpoint_path(args)
    for rank, (rank_1_lacks, rank_0_lacks, (both_have, run_name, amp)) in ranks.items():
        # both stop, with the same message: which rank on which host lacks which file
        assert rank_1_lacks.startswith('--resume auto: rank 1 (host ') and 'rank 0' not in rank_1_lacks, rank
        assert f'cannot read the checkpoint {path}' in rank_1_lacks and '--output_dir' in rank_1_lacks
        assert rank_0_lacks is None, rank  # rank 0 starts afresh: so does every rank
        assert (both_have, run_name, amp) == (path, args.run_name, args.amp), rank  # rank 0's run, on both
    assert ranks[0][0] == ranks[1][0]
