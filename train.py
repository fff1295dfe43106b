"""Train an embedding network with class proxies and evaluate it on the unseen test classes.

    python train.py --data_name cub --backbone_type inception --loss_name normalized_softmax
    torchrun --nproc_per_node=4 train.py --data_name cub ...   # data-parallel, same flags

main() reads top to bottom: data -> model -> for every epoch: train_epoch -> evaluate_epoch (every
--eval_every-th epoch) -> save_epoch. Epoch 0 evaluates the untrained network. Files go to --output_dir, named by
utils.run_name(); the checkpoint written after every epoch is what --resume continues from.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_utils import PREPARERS, load_splits, validation_splits
from loss import LOSSES, build_loss, loss_recipe
from model import (BACKBONES, EMBEDDING_NORMS, POOLINGS, Model, backbone_spec, embed, preferred_memory_format, recipe,
                   weights_file)
from utils import (AMP_DTYPES, METRICS, HelpFormatter, ImageDataset, Range, RetrievalData, add_amp_argument,
                   add_device_argument, atomic_path, build_database, build_transforms, collapse_diagnostics, evaluate,
                   load_torch_file, metric_columns, plot_embedding_map, plot_statistics, precision_label,
                   queries_folder, resolve_amp, resolve_device, run_defining, run_name, run_script, save_torch_file)

NMI_MAX_CLASSES = 1000
CHECKPOINT_KEYS = ('model', 'loss', 'optimizer', 'scheduler', 'scaler', 'epoch', 'statistics', 'args')


def backbone_type(name):
    try:
        backbone_spec(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'invalid choice: {e}') from None
    return name


def usable_cpus():
    """The CPUs this process may run on: its affinity (a job scheduler's or taskset's share of the
    machine), where the system tells it."""
    return os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else range(os.cpu_count())


def default_num_workers(cpus, local_ranks, most=8):
    """--num_workers' default: each of the local_ranks processes on this node its share of the
    CPUs, so that the ranks' workers do not fight over them; 0 (loading in the process itself) where
    there are more ranks than CPUs."""
    return min(most, len(cpus) // max(local_ranks, 1))


def build_parser():
    parser = argparse.ArgumentParser(description='Train a proxy-based embedding network for image retrieval.',
                                     formatter_class=HelpFormatter)
    parser.add_argument('--data_path', default='data', help='folder holding one sub-folder per dataset')
    parser.add_argument('--data_name', default='car',
                        help=f'a built-in data set ({", ".join(PREPARERS)}) or your own, '
                             'prepared by data_utils.py from DATA_PATH/DATA_NAME/')
    parser.add_argument('--val_fraction', type=Range(float, 0, 1, closed=False), default=None, metavar='F',
                        help='evaluate on the last F of the sorted training classes, trained without them, '
                             'instead of on the test classes: for choosing hyperparameters')
    parser.add_argument('--crop', action='store_true', help='use the bounding-box crops (data_utils.py --crop)')
    parser.add_argument('--max_size', type=Range(int, 1), default=None,
                        help='use the resized copies of data_utils.py --max_size N (cheaper decoding)')
    parser.add_argument('--backbone_type', default='resnet50', type=backbone_type,
                        help=f'{", ".join(BACKBONES)}, or timm:NAME for any timm model, e.g. timm:vit_small_patch16_224.dino; '
                             f'its family (CNN or ViT) sets the defaults of the recipe flags')
    parser.add_argument('--pretrained', default='imagenet',
                        help="'imagenet' (the official file, downloaded into its library's cache when absent), "
                             "'none', or a state dict PATH or http(s) URL (.pth, .pt or .safetensors)")
    parser.add_argument('--offline', action='store_true',
                        help='download no weights (as with HF_HUB_OFFLINE=1): a file not in its cache is an error')
    parser.add_argument('--pooling', default='max', choices=list(POOLINGS),
                        help="CNNs: max or avgmax; ViTs: token (their own CLS-token pooling)")
    parser.add_argument('--no_freeze_bn', dest='freeze_bn', action='store_false',
                        help='let BatchNorm statistics of a pretrained backbone train')
    parser.add_argument('--loss_name', default='positive_proxy', choices=list(LOSSES))
    parser.add_argument('--feature_dim', type=Range(int, 1), default=512)
    parser.add_argument('--embedding_norm', default='none', choices=list(EMBEDDING_NORMS),
                        help='what the embedding goes through before its L2 normalisation: batchnorm (without affine) '
                             'or centre subtract the mean embedding, so that proxies trained from scratch do not '
                             'all follow one common direction (docs/method.md)')
    parser.add_argument('--scale', type=Range(float, 0, closed=False), default=32.0,
                        help="softmax temperature: logits = scale * cosine; Proxy-Anchor's alpha")
    parser.add_argument('--batch_size', type=Range(int, 1), default=64, help='global: split evenly over the torchrun processes')
    parser.add_argument('--samples_per_class', type=Range(int, 1), default=None, metavar='M',
                        help='class-balanced batches: M images of each of batch_size / M classes '
                             '(default: batches drawn at random)')
    parser.add_argument('--num_epochs', type=Range(int, 1), default=20)
    parser.add_argument('--lr', type=Range(float, 0, closed=False), default=1e-4, help='learning rate of the network')
    parser.add_argument('--proxy_lr', type=Range(float, 0, closed=False), default=1e-2, help='learning rate of the proxies')
    parser.add_argument('--proxy_init', default='random', choices=list(PROXY_INITS),
                        help="the proxies' start: random directions, or each class's mean embedding under the "
                             "untrained network (one extra pass over the training set)")
    parser.add_argument('--weight_decay', type=Range(float, 0), default=1e-4)
    parser.add_argument('--lr_decay_step', type=Range(int, 1), default=10, help='epochs between learning-rate decays')
    parser.add_argument('--lr_decay_gamma', type=Range(float, 0, closed=False), default=0.5)
    parser.add_argument('--warmup_epochs', type=Range(int, 0), default=0,
                        help='first epochs in which the backbone trunk does not learn, only the embedding head and proxies')
    parser.add_argument('--clip_grad', type=Range(float, 0), default=0.0, help='clip the norm of the network gradient to this; 0: off')
    parser.add_argument('--image_size', type=Range(int, 1), default=224)
    parser.add_argument('--recalls', default='1,2,4,8', help='the K of Recall@K, comma-separated')
    parser.add_argument('--eval_every', type=Range(int, 1), default=1, metavar='N',
                        help='evaluate every N-th epoch (and always epoch 0 and the last); the others train and '
                             'save their checkpoint, and their CSV row has no test metrics')
    parser.add_argument('--metrics', default=None,
                        help=f'comma-separated subset of {",".join(METRICS)}; default: all, '
                             f'without nmi when the test set has over {NMI_MAX_CLASSES} classes (k-means is slow there)')
    add_device_argument(parser)
    add_amp_argument(parser)
    parser.add_argument('--compile', action='store_true', help='torch.compile the network')
    parser.add_argument('--num_workers', type=Range(int, 0),
                        default=default_num_workers(usable_cpus(), int(os.environ.get('LOCAL_WORLD_SIZE', 1))),
                        help='data-loading processes of each training process; default: the CPUs this process may '
                             "run on (its affinity) divided by torchrun's processes on this node, at most 8")
    parser.add_argument('--seed', type=Range(int, 0), default=0)
    parser.add_argument('--output_dir', default='results')
    parser.add_argument('--resume', default=None,
                        help="a checkpoint PATH, or 'auto': this run's checkpoint in --output_dir if there is one")
    parser.add_argument('--keep_checkpoint', action='store_true',
                        help="keep the run's resume checkpoint (network, proxies and optimizer state) once it "
                             "has finished; by default the finished run removes it")
    return parser


def checked(parser, args):
    """The parsed arguments in the form the run uses, or an error naming the flag."""
    try:
        args.recalls = [Range(int, 1)(k) for k in args.recalls.split(',')]
    except argparse.ArgumentTypeError:
        parser.error(f'--recalls expects comma-separated integers >= 1 like 1,2,4,8, got {args.recalls!r}')
    if args.samples_per_class is not None and args.batch_size % args.samples_per_class:
        parser.error(f'--samples_per_class {args.samples_per_class} must divide --batch_size {args.batch_size}')
    if args.metrics is not None:
        args.metrics = args.metrics.split(',')
        if not set(args.metrics) <= set(METRICS):
            parser.error(f'--metrics expects a comma-separated subset of {",".join(METRICS)}, got {",".join(args.metrics)}')
    args.device = resolve_device(args.device)
    try:
        args.amp = precision(args.amp, args)  # the precision run, as the run's arguments store it
    except ValueError as e:
        parser.error(str(e))
    return args


def precision(amp, args):
    """--amp resolved for the run's device, backbone and image size (on a CPU, --amp auto trains in
    bf16 only what trains faster in it)."""
    return resolve_amp(amp, args.device, args.image_size >= backbone_spec(args.backbone_type).cpu_bf16_training_from)


def parse_args(argv=None, amp_default='auto'):
    """The run's arguments, checked; amp_default: --amp's default ('none' until --amp auto became it)."""
    parser = build_parser()
    # the backbone's family (model.FAMILIES) and the loss (loss.RECIPES) set the recipe defaults: parse
    # once to learn them, then for real; the run is named against these defaults
    first = parser.parse_known_args(argv)[0]
    parser.set_defaults(**{**recipe(first.backbone_type), **loss_recipe(first.loss_name)}, amp=amp_default)
    args = parser.parse_args(argv)
    precision_chosen = args.amp == 'auto'
    args, defaults = checked(parser, args), vars(checked(parser, parser.parse_args([])))
    # the precision --amp's default chooses for this run is the neutral one: a default run is named
    # as it always was, whatever it chose
    defaults['amp'] = precision(amp_default, args)
    args.run_name = run_name(args, defaults)
    if args.resume:
        return continued_run(args, defaults, precision_chosen)
    refuse_writing_over_another_run(args)
    return args


def run_prefix(args):
    """What every file of the run is named with: {output_dir}/{run_name}, then _{kind}."""
    return os.path.join(args.output_dir, args.run_name)


def checkpoint_path(args):
    return f'{run_prefix(args)}_checkpoint.pth'


def continued_run(args, defaults, precision_chosen):
    """--resume and the runs begun before --amp auto was the default. Those were named against fp32:
    where this run has no checkpoint but one exists under that older name, --resume auto continues
    it. And under --amp auto a run continues in the precision it began in, as its arguments say."""
    if args.resume == 'auto' and not os.path.exists(checkpoint_path(args)):
        older = argparse.Namespace(**{**vars(args), 'run_name': run_name(args, {**defaults, 'amp': 'none'})})
        if os.path.exists(checkpoint_path(older)):
            print(f'--resume auto: continuing {older.run_name}, the name this run had before --amp auto')
            args = older
    path = checkpoint_path(args) if args.resume == 'auto' else args.resume
    began_in = stored_arguments(path).get('amp')
    if precision_chosen and began_in not in (None, args.amp):
        print(f'--amp auto: {path} began in {precision_label(began_in)} and continues so')
        args.amp = began_in
    return args


# what a run had before each of these flags existed: its _args.json then lacks them
BEFORE_THE_FLAG = {'embedding_norm': 'none', 'samples_per_class': None, 'proxy_init': 'random'}


def refuse_writing_over_another_run(args):
    """A run's name hashes only the arguments that differ from their defaults, so a fresh run can
    meet files of its name written by a run under other defaults: another precision (begun before
    --amp auto was the default, or on a device that resolves it otherwise), or a recipe default
    changed since. It would write over them: refuse, naming what differs."""
    stored = stored_arguments(checkpoint_path(args))
    if not stored:
        return
    stored = {**BEFORE_THE_FLAG, **stored}
    if stored.get('amp') not in (None, args.amp):
        raise ValueError(f'{run_prefix(args)}_* hold a run trained in {precision_label(stored["amp"])}, and this one '
                         f'trains in {precision_label(args.amp)}: continue that run with --resume auto, '
                         f'or start this one with another --output_dir')
    # None now: decided later in main() (--metrics), or a flag off, which a run of this name has off too
    differences = [f'--{key} {stored[key]} there, {value} now' for key, value in run_defining(args).items()
                   if key in stored and value is not None and stored[key] != value]
    if differences:
        raise ValueError(f'{run_prefix(args)}_* hold another run of this name ({"; ".join(differences)}): '
                         f'start this one with another --output_dir, or move those files')


def stored_arguments(checkpoint):
    """The arguments a run wrote beside its checkpoint ({run}_args.json), or {} if there are none."""
    try:
        with open(checkpoint.removesuffix('_checkpoint.pth') + '_args.json') as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def init_distributed(args):
    """Join torchrun's process group (world size > 1), else run alone: (rank, world size, device)."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size == 1:
        return 0, 1, torch.device(args.device)
    if args.batch_size % world_size:
        raise ValueError(f'--batch_size {args.batch_size} is global and must divide evenly over {world_size} processes')
    if args.device == 'cuda':
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    dist.init_process_group('nccl' if args.device == 'cuda' else 'gloo')
    device = torch.device('cuda', torch.cuda.current_device()) if args.device == 'cuda' else torch.device('cpu')
    return dist.get_rank(), world_size, device

def use_fast_cuda_kernels(device):
    """On CUDA: cuDNN picks the fastest convolution algorithm for the run's fixed image size once
    (cudnn.benchmark), and fp32 matrix products run in TF32 (10-bit mantissa, fp32 range), whose
    rounding training tolerates as it tolerates bf16 (cuDNN's convolutions do by default). Set
    with set_float32_matmul_precision, the setting torch.compile's Inductor reads back: the newer
    per-backend fp32_precision flags make that read raise in torch 2.14. Nothing on a CPU."""
    if device.type != 'cuda':
        return
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision('high')


@contextlib.contextmanager
def exact_fp32_matmul():
    """Matrix products in full fp32 inside, as they were before: the similarities that rank the
    neighbours must not round to TF32, which would move near-ties and the metrics with them."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)

# -----------------------------------------------------------------------------
# the model, the loss and what steps them


class ProxyTraining(nn.Module):
    """The network and the loss (which holds the proxies) as one module: under DDP the proxies'
    gradients are reduced with the network's, so the proxies stay identical on every rank."""

    def __init__(self, network, loss_fn, amp_dtype):
        super().__init__()
        self.network, self.loss_fn, self.amp_dtype = network, loss_fn, amp_dtype

    def forward(self, images, labels):
        with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            embeddings = self.network(images)
        return self.loss_fn(embeddings, labels), embeddings  # the loss upcasts: proxy math in fp32


@dataclass
class Training:
    """Everything a training epoch steps, built once by build_training; a checkpoint is its state."""
    model: Model  # the plain network, whose state is saved
    network: nn.Module  # what runs it: the model, or its torch.compile wrapper
    loss_fn: nn.Module  # holds the proxies
    trainer: nn.Module  # ProxyTraining, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    world_size: int = 1
    num_epochs: int = 1
    warmup_epochs: int = 0  # epochs in which the trunk does not learn
    clip_grad: float = 0.0  # the largest norm of the network's gradient; 0: no clipping
    warmup_trainer: nn.Module | None = None  # what trains in the warm-up (trainer_for); None: the trainer

    STATE = ('model', 'optimizer', 'scheduler', 'scaler')

    def trainer_for(self, epoch):
        """What trains in this epoch. In the warm-up the pretrained trunk holds still while the new
        head and proxies settle: it runs outside autograd, so no graph is kept through it and no
        backward runs through it, and its gradients stay None (AdamW then neither updates nor decays
        it); its BatchNorm layers behave as in any other epoch. Under DDP the warm-up has its own
        wrapper, whose reducer holds only the head and proxies."""
        warming_up = epoch <= self.warmup_epochs
        self.model.trunk.requires_grad_(not warming_up)
        return self.warmup_trainer if warming_up and self.warmup_trainer is not None else self.trainer

    def state_dict(self):
        return {'loss': self.loss_fn.state_dict(), **{key: getattr(self, key).state_dict() for key in self.STATE}}

    def load_state_dict(self, state):
        self.loss_fn.load_state_dict(state['loss'])
        for key in self.STATE:
            getattr(self, key).load_state_dict(state[key])


def build_optimizer(model, loss_fn, args):
    # the recipe of the proxy-based methods: AdamW, proxies learning 100x faster (step decay in build_training)
    # fused (on CUDA and the CPU alike): one kernel, and no read of the step count back to the host,
    # which the default single-tensor path does every step
    return torch.optim.AdamW([{'params': model.parameters(), 'lr': args.lr},
                              {'params': loss_fn.parameters(), 'lr': args.proxy_lr}],
                             weight_decay=args.weight_decay, fused=True)


@torch.no_grad()
def class_mean_proxies(training, loader, labels, progress=True):
    """Each proxy set to its class's mean embedding under the network as it is (untrained)."""
    embeddings = embed(training.network, loader, training.world_size, training.amp_dtype,
                       'embed train set (proxies)', progress, training.memory_format)
    labels = torch.as_tensor(labels, device=embeddings.device)
    proxies = training.loss_fn.proxies
    sums = torch.zeros(proxies.shape, dtype=embeddings.dtype, device=embeddings.device).index_add_(0, labels, embeddings)
    proxies.copy_(sums / torch.bincount(labels, minlength=len(proxies)).clamp(min=1)[:, None])


# --proxy_init: how the proxies start (random: as the loss built them)
PROXY_INITS = {'random': None, 'class_means': class_mean_proxies}


def build_training(args, num_classes, device, world_size=1, memory_format=None):
    """The network, proxies, optimizer, schedule and gradient scaler of a run, on device.
    memory_format: how images are laid out (default: preferred_memory_format for the device and backbone)."""
    model = Model(args.backbone_type, args.feature_dim, args.pretrained, args.pooling, args.freeze_bn, args.image_size,
                  args.embedding_norm, offline=args.offline)
    memory_format = memory_format or preferred_memory_format(device, model.backbone_spec)
    model = model.to(device, memory_format=memory_format)
    network = torch.compile(model) if args.compile else model
    amp_dtype = AMP_DTYPES[args.amp]
    loss_fn = build_loss(args.loss_name, num_classes, args.feature_dim, args.scale).to(device)
    trainer, warmup_trainer = ProxyTraining(network, loss_fn, amp_dtype), None
    if world_size > 1:
        wrap = functools.partial(DistributedDataParallel, device_ids=[device.index] if device.type == 'cuda' else None)
        if args.warmup_epochs:
            # built while the trunk is out of autograd, as in the warm-up: a reducer that expected the
            # trunk's gradients would wait for them forever (find_unused_parameters would instead
            # search the graph at every step)
            model.trunk.requires_grad_(False)
            warmup_trainer = wrap(trainer)
            model.trunk.requires_grad_(True)
        trainer = wrap(trainer)
    optimizer = build_optimizer(model, loss_fn, args)
    return Training(model, network, loss_fn, trainer, optimizer,
                    scheduler=torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_gamma),
                    scaler=torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16'),
                    amp_dtype=amp_dtype, memory_format=memory_format, world_size=world_size,
                    num_epochs=args.num_epochs, warmup_epochs=args.warmup_epochs, clip_grad=args.clip_grad,
                    warmup_trainer=warmup_trainer)

# -----------------------------------------------------------------------------
# data loading


# more than any run's epochs, so no two ranks' streams meet, and small enough that 4096 ranks differ
# in the low 32 bits of their seeds: all that torch's CPU generator (a Mersenne Twister) keeps of one
RANK_SEED_STRIDE = 2 ** 20


def epoch_seed(seed, epoch, rank=0):
    """The seed of torch's generator in an epoch on a rank, from which its augmentations and its
    DataLoader workers' seeds follow: each rank its own stream, rank 0 the one a single process
    has always had."""
    return seed * 1_000_003 + epoch + rank * RANK_SEED_STRIDE


def start_epoch(train_loader, seed, epoch, rank=0):
    """Every epoch's randomness (batch order, augmentations, worker seeds) follows from (seed,
    epoch, rank) alone, so resuming after epoch e replays epoch e + 1 exactly."""
    torch.manual_seed(epoch_seed(seed, epoch, rank))
    train_loader.sampler.set_epoch(epoch)


class ClassBalancedSampler(torch.utils.data.Sampler):
    """Class-balanced batches: each global batch holds samples_per_class (M) images of each of
    batch_size / M distinct classes, so that every proxy in it learns from M embeddings of its class
    rather than from one or none. Classes are visited in a new random order every epoch, and each
    class's images in a new random order; a class with fewer than M images repeats some of them.
    An epoch has as many batches as random batching gives. Under torchrun, rank r takes the r-th
    slice of every global batch: whole classes wherever M divides the per-rank batch. The order
    follows (seed, epoch) alone (set_epoch), so a resumed run draws the batches it would have drawn."""

    def __init__(self, labels, batch_size, samples_per_class, world_size=1, rank=0, seed=0):
        self.by_class = {}
        for index, label in enumerate(labels):
            self.by_class.setdefault(int(label), []).append(index)
        self.classes_per_batch = batch_size // samples_per_class
        if self.classes_per_batch > len(self.by_class):
            raise ValueError(f'--batch_size {batch_size} / --samples_per_class {samples_per_class} = '
                             f'{self.classes_per_batch} classes a batch, but the training set has {len(self.by_class)}')
        self.batch_size, self.samples_per_class = batch_size, samples_per_class
        self.world_size, self.rank, self.seed, self.epoch = world_size, rank, seed, 0
        self.num_batches = len(labels) // batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def short_classes(self):
        """The classes with fewer than M images (they repeat images within a batch)."""
        return [label for label, indices in self.by_class.items() if len(indices) < self.samples_per_class]

    def global_batches(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))  # one order for all ranks
        order = lambda n: torch.randperm(n, generator=generator).tolist()  # noqa: E731
        classes, queue, cursor = sorted(self.by_class), [], {}
        for _ in range(self.num_batches):
            if len(queue) < self.classes_per_batch:  # the next round of classes, in a new order
                queue += [classes[i] for i in order(len(classes)) if classes[i] not in queue]
            batch_classes, queue = queue[:self.classes_per_batch], queue[self.classes_per_batch:]
            batch = []
            for label in batch_classes:
                batch += self.take(label, cursor, order)
            yield batch

    def take(self, label, cursor, order):
        """M of the class's images, going through them in a random order and starting a new one when they run out."""
        indices, taken = self.by_class[label], []
        while len(taken) < self.samples_per_class:
            if not cursor.get(label):  # a new round, the images this batch already holds last
                fresh = [indices[i] for i in order(len(indices))]
                cursor[label] = [i for i in fresh if i not in taken] + [i for i in fresh if i in taken]
            need = self.samples_per_class - len(taken)
            taken += cursor[label][:need]
            cursor[label] = cursor[label][need:]
        return taken

    def __iter__(self):
        share = self.batch_size // self.world_size
        for batch in self.global_batches():
            yield from batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self):
        return self.num_batches * (self.batch_size // self.world_size)


def build_loader(images, labels, transform, train, args, device, rank=0, world_size=1):
    """The DataLoader of this rank's share: shuffled (or class-balanced) and cut to whole batches
    for training, strided shards in order (for embed()) otherwise."""
    dataset = ImageDataset(images, labels, transform)
    if train and args.samples_per_class:
        sampler = ClassBalancedSampler(labels, args.batch_size, args.samples_per_class, world_size, rank, args.seed)
    elif train:  # a new order per epoch (set_epoch), each rank its disjoint share
        sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed,
                                                      drop_last=True)
    else:  # strided shards, gathered back by embed()
        sampler = range(rank, len(dataset), world_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size // world_size, sampler=sampler, drop_last=train,
        num_workers=args.num_workers, pin_memory=device.type == 'cuda',
        prefetch_factor=4 if args.num_workers else None,
        # train workers restart every epoch, seeded from the epoch's seed, so a resumed run
        # augments exactly like an uninterrupted one; evaluation has no randomness to keep
        persistent_workers=args.num_workers > 0 and not train)


def build_loaders(data, training, args, device, rank, world_size):
    """The augmented training loader, and one unaugmented loader per split to embed: the test set
    (the gallery), In-shop's queries, and the train set (embedded once, for the database)."""
    train_transform, test_transform = build_transforms(training.model.backbone_spec, args.image_size)
    loader = functools.partial(build_loader, args=args, device=device, rank=rank, world_size=world_size)
    train_loader = loader(*data.split('train'), train_transform, train=True)
    embed_loaders = {split: loader(*data.split(split), test_transform, train=False) for split in data.images}
    return train_loader, embed_loaders

# -----------------------------------------------------------------------------
# one epoch: train, evaluate, save


def sync_buffers(model, world_size):
    """Each rank's BatchNorm statistics follow its own batches; rank 0's are the ones saved, so
    every rank embeds with them too (DDP itself broadcasts them before each training forward)."""
    if world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def step(training):
    """The optimizer step, with gradient clipping. A trunk held still by the warm-up has no
    gradient (Training.trainer_for), and AdamW skips it."""
    if training.clip_grad:
        training.scaler.unscale_(training.optimizer)  # fp16: clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(training.model.parameters(), training.clip_grad)
    training.scaler.step(training.optimizer)
    training.scaler.update()


def train_step(training, trainer, images, labels):
    """One optimizer step of trainer (Training.trainer_for the epoch) on a batch on the device: (its
    loss, its correct proxy predictions, the proxies a gradient reached), left on the device:
    nothing here waits for the device's queue."""
    loss, embeddings = trainer(images, labels)
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()  # fp16: scaled so small gradients do not flush to zero
    # under a positive-only rule a proxy learns only in the batches that hold its class
    reached = training.loss_fn.proxies.grad.ne(0).any(dim=1)
    step(training)
    return loss.detach(), (training.loss_fn.predict(embeddings) == labels).sum(), reached


class EpochSums:
    """An epoch's running sums, on the device so that adding a step's never waits for it: the loss
    times the batch's size, the correct predictions, the non-finite losses, the proxies reached;
    the images seen are known on the host. read() is where the host waits."""

    def __init__(self, num_proxies, device, world_size, epoch):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.reached = torch.zeros(num_proxies, dtype=torch.bool, device=device)
        self.seen, self.world_size, self.epoch, self.steps_read = 0, world_size, epoch, 0

    def add(self, loss, correct, reached, batch_size):
        self.sums += torch.stack([loss.double() * batch_size, correct.double(), (~loss.isfinite()).double()])
        self.reached |= reached
        self.seen += batch_size

    def read(self, steps):
        """(mean loss, accuracy) over every rank's share of the first `steps` steps, or FloatingPointError
        naming the steps since the last read, one of which had a non-finite loss. Under torchrun every rank
        reads at the same step and sees the same sums, so all stop together (a rank that left alone
        would leave the others waiting forever)."""
        totals = torch.cat([self.sums, self.sums.new_tensor([self.seen])])
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss, correct, non_finite, seen = totals.tolist()
        if non_finite:
            raise FloatingPointError(f'the loss became non-finite in epoch {self.epoch}, '
                                     f'in one of its steps {self.steps_read + 1} to {steps}')
        self.steps_read = steps
        return loss / seen, correct / seen

    def reached_share(self):
        # DDP averages the proxies' gradient over the ranks, so every rank saw the same rows reached
        return self.reached.double().mean().item()


LOG_EVERY = 50  # steps between reads of the running sums: each read drains the device's queue


def train_epoch(training, loader, epoch, progress=True, log_every=LOG_EVERY):
    """One pass over the loader's batches, then the learning-rate schedule's step:
    (mean loss, proxy-classification accuracy, share of the proxies that a gradient reached)
    over every rank's share. The sums stay on the device and are read (for the progress bar) every
    log_every steps and at the last; a non-finite loss raises FloatingPointError at the next read.
    The weights it reached are in memory only: main keeps the previous epoch's files."""
    trainer = training.trainer_for(epoch)  # in a warm-up epoch, without the trunk
    trainer.train()
    device = next(trainer.parameters()).device
    sums = EpochSums(len(training.loss_fn.proxies), device, training.world_size, epoch)
    bar = tqdm(loader, desc=f'train {epoch}/{training.num_epochs}', dynamic_ncols=True, disable=not progress)
    for number, (images, labels) in enumerate(bar, 1):
        images = images.to(device, non_blocking=True, memory_format=training.memory_format)
        labels = labels.to(device, non_blocking=True)
        sums.add(*train_step(training, trainer, images, labels), len(labels))
        if number % log_every == 0 or number == len(loader):
            loss, accuracy = sums.read(number)
            bar.set_postfix(loss=f'{loss:.4f}', acc=f'{100 * accuracy:.2f}%')
    training.scheduler.step()
    sync_buffers(training.model, training.world_size)
    return loss, accuracy, sums.reached_share()


def evaluated(epoch, args):
    """Whether the epoch is evaluated: every --eval_every-th, and always epoch 0 (the baseline) and
    the last (the network the run leaves)."""
    return epoch in (0, args.num_epochs) or epoch % args.eval_every == 0


def measure(training, data, embeddings, args):
    """The test metrics and the collapse diagnostics of the embedded splits, in full fp32:
    ({metric: value}, {diagnostic: value})."""
    with exact_fp32_matmul():
        if 'query' in embeddings:  # In-shop: queries search the gallery
            metrics = evaluate(embeddings['query'], data.labels['query'], args.recalls, embeddings['test'],
                               data.labels['test'], args.metrics)
        else:
            metrics = evaluate(embeddings['test'], data.labels['test'], args.recalls, metrics=args.metrics)
        return metrics, collapse_diagnostics(training.loss_fn.proxies, embeddings['test'])


def evaluate_epoch(training, loaders, data, args, epoch, is_main=True, measure=measure):
    """Embed the test set (and In-shop's queries); at the final epoch also the train set, for the
    database. Every rank embeds its shard and receives every shard (embed gathers); rank 0 alone
    (is_main) then measures them, as it alone writes files and prints. Returns ({split:
    embeddings}, metrics, diagnostics), the last two {} on the other ranks."""
    def embed_split(split):
        name = 'validation' if split == 'test' and args.val_fraction else split  # --val_fraction reads no test image
        return embed(training.network, loaders[split], training.world_size, training.amp_dtype,
                     f'embed {name} set', is_main, training.memory_format)
    splits = ['test', 'query'] if data.images['query'] else ['test']
    if epoch == args.num_epochs:  # one extra pass, so only for the final model
        splits.append('train')
    embeddings = {split: embed_split(split) for split in splits}
    return (embeddings, *measure(training, data, embeddings, args)) if is_main else (embeddings, {}, {})


def best_epoch(statistics):
    """(the trained epoch with the highest first test metric, that metric): R@1 by default, the
    earliest of ties; the epoch is None before any has been evaluated."""
    table = pd.DataFrame(statistics)
    metric = metric_columns([table])[0]
    scores = table.set_index('epoch')[metric].drop(0, errors='ignore').dropna()
    return (int(scores.idxmax()) if len(scores) else None), metric


def save_epoch(training, data, embeddings, statistics, args, name):
    """Every file of the epoch, each written atomically: the statistics CSV and figure, the model
    (with --val_fraction, also as _best_model.pth while the epoch is the best on the validation
    classes), the feature database (of an evaluated epoch: embeddings not None) and, last, the
    checkpoint: a checkpoint on disk means its epoch is complete."""
    epoch = statistics[-1]['epoch']
    table = pd.DataFrame(statistics)
    with atomic_path(f'{name}_statistics.csv') as tmp:
        table.to_csv(tmp, index=False)
    plot_statistics(table, f'{name}_results.png')
    model_file = {'model': training.model.state_dict(), 'proxies': training.loss_fn.state_dict(), 'epoch': epoch,
                  'args': vars(args)}
    save_torch_file(model_file, f'{name}_model.pth')
    if args.val_fraction and best_epoch(statistics)[0] == epoch:  # the epoch to choose, kept beside the last
        save_torch_file(model_file, f'{name}_best_model.pth')
    if embeddings is not None:  # an epoch --eval_every skips leaves the last evaluated one's database
        save_torch_file(build_database(data, embeddings, training.loss_fn.proxies, epoch, vars(args)),
                        f'{name}_data_base.pth')
    save_torch_file({**training.state_dict(), 'epoch': epoch, 'statistics': statistics, 'args': vars(args)},
                    checkpoint_path(args))

# -----------------------------------------------------------------------------
# starting and resuming a run


def load_checkpoint(path, args):
    """The checkpoint at `path`, checked to come from a run with the same defining arguments."""
    checkpoint = load_torch_file(path, 'checkpoint', CHECKPOINT_KEYS, not_found=f'--resume {path}: no such checkpoint')
    saved = {**BEFORE_THE_FLAG, **checkpoint['args']}
    differences = [f'--{key} {saved.get(key)!r} there, {value!r} now'
                   for key, value in run_defining(args).items() if saved.get(key) != value]
    if differences:
        raise ValueError(f'--resume {path} belongs to another run: ' + '; '.join(differences))
    return checkpoint


def checkpoint_to_resume(args, rank=0, world_size=1, readable=os.path.isfile):
    """The checkpoint the run continues from (None: a fresh start), the same on every rank.
    Rank 0 decides: under --resume auto, whether its disk holds the run's checkpoint, under the name
    and precision parse_args chose there; the other ranks take that name, precision and path. Then
    every rank says whether it can read the file (readable(path)). Without a shared file system a
    node lacking it would start at epoch 0 while rank 0 resumes, and the ranks would hang at their
    first disagreement; instead every rank stops, each naming the ranks and hosts that lack it (each
    node's torchrun prints only its own ranks' output)."""
    path = checkpoint_path(args) if args.resume == 'auto' else args.resume
    if args.resume == 'auto' and not readable(path):
        path = None
    if world_size == 1:
        return path  # an explicit path that is not there: load_checkpoint says so
    decided = [args.run_name, args.amp, path]
    dist.broadcast_object_list(decided, src=0)
    args.run_name, args.amp, path = decided
    if path is None:
        return None
    readers = [None] * world_size
    dist.all_gather_object(readers, (rank, socket.gethostname(), readable(path)))
    lacking = [f'rank {other} (host {host})' for other, host, can in readers if not can]
    if lacking:
        where = ('--output_dir on a file system that every node shares' if args.resume == 'auto'
                 else 'the checkpoint on a file system that every node shares')
        raise FileNotFoundError(f'--resume {args.resume}: {" and ".join(lacking)} cannot read the checkpoint '
                                f'{path}, which every process loads. Put {where}, or copy the file to that path '
                                f'on every node')
    return path


def finished_statistics(args):
    """The statistics of this run if it has already trained its last epoch, else []."""
    try:
        statistics = pd.read_csv(f'{run_prefix(args)}_statistics.csv').to_dict('records')
    except (OSError, ValueError):
        return []
    return statistics if statistics and statistics[-1]['epoch'] == args.num_epochs else []


def resume(training, path, args, is_main):
    """(statistics so far, first epoch to run): from the checkpoint at `path` (checkpoint_to_resume),
    else (None) a fresh start."""
    if path is None:
        finished = finished_statistics(args) if args.resume == 'auto' else []
        if training.world_size > 1:  # rank 0's files decide, as they decide the checkpoint
            decided = [finished]
            dist.broadcast_object_list(decided, src=0)
            finished = decided[0]
        if finished:  # it removed its checkpoint at its end (--keep_checkpoint keeps it)
            return finished, args.num_epochs + 1
        if args.resume == 'auto' and is_main:
            print(f'--resume auto: no checkpoint {checkpoint_path(args)} yet, starting from epoch 0')
        return [], 0
    checkpoint = load_checkpoint(path, args)
    training.load_state_dict(checkpoint)
    if is_main:
        print(f'resuming from {path} after epoch {checkpoint["epoch"]}')
    return checkpoint['statistics'], checkpoint['epoch'] + 1


def announce(args, data, name, device, world_size, sampler=None):
    """Write the run's arguments, and say what it trains on (and, with class-balanced batches, which
    classes have too few images for them)."""
    os.makedirs(args.output_dir, exist_ok=True)
    with atomic_path(f'{name}_args.json') as tmp, open(tmp, 'w') as f:
        json.dump(vars(args), f, indent=2)
    print(f'{args.data_name}: {len(data.train_classes)} train classes / {len(data.images["train"])} images, '
          f'{len(data.test_classes)} {"validation" if args.val_fraction else "test"} classes / '
          f'{len(data.images["test"])} images; {args.backbone_type} on {device}'
          + (f' x {world_size} processes' if world_size > 1 else '')
          + f' in {precision_label(args.amp)} (--amp); files {name}_*')
    short = sampler.short_classes() if isinstance(sampler, ClassBalancedSampler) else []
    if short:
        names = ', '.join(data.train_classes[label] for label in short[:5]) + (', ...' if len(short) > 5 else '')
        print(f'--samples_per_class {args.samples_per_class}: {len(short)} training classes have fewer images '
              f'({names}); their images repeat within a batch')


def epoch_line(epoch, num_epochs, loss, accuracy, metrics, seconds):
    """What an epoch prints: its training loss and proxy accuracy (epoch 0 has none: the untrained
    network), then every test metric (none: an epoch --eval_every skips)."""
    trained = f'loss {loss:.4f}  acc {100 * accuracy:.2f}%' if epoch else 'untrained'
    tested = '  '.join(f'{key.replace("recall@", "R@")} {100 * value:.2f}%' for key, value in metrics.items()) or \
        'not evaluated (--eval_every)'
    return f'epoch {epoch}/{num_epochs}  {trained}  {tested}  ({seconds:.0f}s)'


COLLAPSED_PROXY_COSINE = 0.3  # proxies whose mean pairwise cosine is above this share one cone


def summary(statistics, num_queries):
    """The run in a few lines: every test metric at the final epoch against the untrained network's,
    a drop flagged where it is larger than chance on num_queries queries can explain (two standard
    errors of a difference of two fractions), and the proxies' collapse diagnostics."""
    first, last = statistics[0], statistics[-1]
    lines = [f'epoch {last["epoch"]} against the untrained network, on {num_queries} test queries:']
    for key in metric_columns([pd.DataFrame(statistics)]):
        before, after = first[key], last[key]
        noise = 2 * (2 * max(before * (1 - before), 1 / num_queries) / num_queries) ** 0.5
        flag = '  <- worse, by more than chance explains: training hurt retrieval' if after < before - noise else ''
        lines.append(f'  {key.replace("recall@", "R@")} {100 * before:.1f}% -> {100 * after:.1f}%'
                     f' ({100 * (after - before):+.1f}){flag}')
    lines.append(f'  proxies: mean pairwise cosine {last["proxy_cosine_mean"]:.2f}, closest two '
                 f'{last["proxy_cosine_max"]:.3f}, length of their mean {last["proxy_mean_length"]:.2f}; '
                 f'{100 * last["proxies_updated"]:.0f}% reached by a gradient in the last epoch; '
                 f'test embeddings\' mean pairwise cosine {last["embedding_cosine_mean"]:.2f}')
    if last['proxy_cosine_mean'] > COLLAPSED_PROXY_COSINE:
        lines.append(f'  the proxies share one cone (mean cosine above {COLLAPSED_PROXY_COSINE}): see '
                     f'docs/method.md#proxy-collapse-from-scratch (--embedding_norm)')
    return '\n'.join(lines)


def finish(args, data, embeddings, name, statistics):
    """The t-SNE map of the final test embeddings, once (it takes seconds), the run's summary and
    the list of files."""
    if embeddings is None:
        print(f'{name} has already trained its last epoch ({args.num_epochs}); nothing to do')
        return
    plot_embedding_map(embeddings['test'], data.labels['test'], data.test_classes, f'{name}_embedding_map.png')
    print(summary(statistics, len(data.labels['query'] or data.labels['test'])))
    kept = ['checkpoint.pth'] if args.keep_checkpoint else []
    if args.val_fraction:
        best, metric = best_epoch(statistics)
        print(f'best epoch on the validation classes by {metric}: {best} (its network: {name}_best_model.pth)')
        kept.append('best_model.pth')
    if not args.keep_checkpoint:  # the largest file, needed only to continue the run
        os.remove(checkpoint_path(args))
    print(f'saved {name}_{{statistics.csv,results.png,results.pdf,embedding_map.png,embedding_map.pdf,'
          f'model.pth,data_base.pth,{",".join([*kept, "args.json"])}}}'
          + ('' if args.keep_checkpoint else '; removed the resume checkpoint (--keep_checkpoint keeps it)'))
    print(f'query it: python test.py --data_base {name}_data_base.pth --query_img_name IMAGE_OR_FOLDER')
    print(f'  (or --random_queries 6: six test images at random); '
          f'the pages it writes: {os.path.join(queries_folder(f"{name}_data_base.pth"), "index.html")}')


def main(argv=None, amp_default='auto'):
    args = parse_args(argv, amp_default)
    rank, world_size, device = init_distributed(args)
    is_main = rank == 0  # only rank 0 prints, writes files and plots
    use_fast_cuda_kernels(device)
    checkpoint = checkpoint_to_resume(args, rank, world_size)  # first: it may set the run's precision
    torch.manual_seed(args.seed)  # the same initial network on every rank

    # data: labels index the sorted class names of each split; the test set is the gallery
    splits = load_splits(args.data_path, args.data_name, args.crop, args.max_size)
    if args.val_fraction is not None:  # the test classes are then never looked at
        splits = validation_splits(splits, args.val_fraction)
    data = RetrievalData.from_splits(splits)
    if args.batch_size > len(data.images['train']):  # flags, then data, then weights: before any work
        raise ValueError(f'--batch_size {args.batch_size} is larger than the {len(data.images["train"])} '
                         f'training images; pass --batch_size {len(data.images["train"])} or less')
    weights_file(backbone_spec(args.backbone_type), args.pretrained, args.offline)
    if args.metrics is None:
        args.metrics = [m for m in METRICS if m != 'nmi' or len(data.test_classes) <= NMI_MAX_CLASSES]
    # model: network, proxies, optimizer; then the loaders, in the network's input convention
    training = build_training(args, len(data.train_classes), device, world_size)
    train_loader, embed_loaders = build_loaders(data, training, args, device, rank, world_size)
    name = run_prefix(args)
    statistics, first_epoch = resume(training, checkpoint, args, is_main)
    if is_main:
        announce(args, data, name, device, world_size, train_loader.sampler)
    if first_epoch == 0 and PROXY_INITS[args.proxy_init]:  # a fresh run; a resumed one has its proxies
        PROXY_INITS[args.proxy_init](training, embed_loaders['train'], data.labels['train'], is_main)

    for epoch in range(first_epoch, args.num_epochs + 1):
        start = time.time()
        start_epoch(train_loader, args.seed, epoch, rank)
        # train; epoch 0 is the untrained network, the baseline every epoch is compared with
        try:
            loss, accuracy, reached = train_epoch(training, train_loader, epoch, is_main) if epoch else (math.nan,) * 3
        except FloatingPointError as e:
            sys.exit(f'error: {e}; stopping. The files of epoch {epoch - 1} are kept in {args.output_dir}/. '
                     f'A lower --lr or --proxy_lr may help.')
        # evaluate on the unseen classes; an epoch --eval_every skips has no metrics (NaN in the CSV)
        embeddings, metrics, diagnostics = (evaluate_epoch(training, embed_loaders, data, args, epoch, is_main)
                                            if evaluated(epoch, args) else (None, {}, {}))
        statistics.append({'epoch': epoch, 'loss': loss, 'accuracy': accuracy, **metrics, **diagnostics,
                           'proxies_updated': reached})
        # save every file of the epoch, then say so
        if is_main:
            save_epoch(training, data, embeddings, statistics, args, name)
            print(epoch_line(epoch, args.num_epochs, loss, accuracy, metrics, time.time() - start), flush=True)

    if is_main:
        finish(args, data, embeddings if first_epoch <= args.num_epochs else None, name, statistics)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    run_script(main)
