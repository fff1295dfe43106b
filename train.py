"""Train an embedding network with class proxies and evaluate it on the unseen test classes.

    python train.py --data_name cub --backbone_type inception --loss_name normalized_softmax
    torchrun --nproc_per_node=4 train.py --data_name cub ...   # data-parallel, same flags

Every epoch: one pass over the training classes, then the test metrics (also before training,
as epoch 0). Files go to --output_dir, named by utils.run_name(); the checkpoint written after
every epoch is what --resume continues from.
"""
import argparse
import functools
import json
import math
import os
import sys
import time

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_utils import PREPARERS, load_splits
from loss import LOSSES, build_loss
from model import BACKBONES, POOLINGS, Model
from utils import (METRICS, ImageDataset, atomic_path, build_transforms, evaluate, flatten_split, plot_embedding_map,
                   plot_statistics, resolve_device, run_name)

NMI_MAX_CLASSES = 1000
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# What a checkpoint was trained with: resuming under other values would silently train another run.
RUN_DEFINING = ('data_name', 'crop', 'max_size', 'backbone_type', 'pooling', 'freeze_bn', 'loss_name', 'feature_dim', 'scale',
                'batch_size', 'num_epochs', 'lr', 'proxy_lr', 'weight_decay', 'lr_decay_step', 'lr_decay_gamma',
                'image_size', 'seed', 'amp')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a proxy-based embedding network for image retrieval.')
    parser.add_argument('--data_path', default='data', help='folder holding one sub-folder per dataset')
    parser.add_argument('--data_name', default='car', choices=list(PREPARERS))
    parser.add_argument('--crop', action='store_true', help='use the bounding-box crops (data_utils.py --crop)')
    parser.add_argument('--max_size', type=int, default=None,
                        help='use the resized copies of data_utils.py --max_size N (cheaper decoding)')
    parser.add_argument('--backbone_type', default='resnet50', choices=list(BACKBONES))
    parser.add_argument('--pretrained', default='imagenet', help="'imagenet' (from $TORCH_HOME), 'none', or a state dict PATH")
    parser.add_argument('--pooling', default='max', choices=list(POOLINGS))
    parser.add_argument('--no_freeze_bn', dest='freeze_bn', action='store_false',
                        help='let BatchNorm statistics of a pretrained backbone train')
    parser.add_argument('--loss_name', default='positive_proxy', choices=list(LOSSES))
    parser.add_argument('--feature_dim', type=int, default=512)
    parser.add_argument('--scale', type=float, default=32.0, help='softmax temperature: logits = scale * cosine')
    parser.add_argument('--batch_size', type=int, default=64, help='global: split evenly over the torchrun processes')
    parser.add_argument('--num_epochs', type=int, default=20)
    parser.add_argument('--lr', type=float, default=1e-4, help='learning rate of the network')
    parser.add_argument('--proxy_lr', type=float, default=1e-2, help='learning rate of the proxies')
    parser.add_argument('--weight_decay', type=float, default=1e-4)
    parser.add_argument('--lr_decay_step', type=int, default=10, help='epochs between learning-rate decays')
    parser.add_argument('--lr_decay_gamma', type=float, default=0.5)
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--recalls', default='1,2,4,8', help='the K of Recall@K, comma-separated')
    parser.add_argument('--metrics', default=None,
                        help=f'comma-separated subset of {",".join(METRICS)}; default: all, '
                             f'without nmi when the test set has over {NMI_MAX_CLASSES} classes (k-means is slow there)')
    parser.add_argument('--device', default='auto', choices=['auto', 'cuda', 'cpu'], help='auto: CUDA when present')
    parser.add_argument('--amp', default='none', choices=list(AMP_DTYPES),
                        help='mixed precision of the network (the loss stays fp32); fp16 is for CUDA')
    parser.add_argument('--compile', action='store_true', help='torch.compile the network')
    parser.add_argument('--num_workers', type=int, default=min(8, os.cpu_count()), help='data loading processes')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output_dir', default='results')
    parser.add_argument('--resume', default=None,
                        help="a checkpoint PATH, or 'auto': this run's checkpoint in --output_dir if there is one")
    args = parser.parse_args(argv)
    try:
        args.recalls = [int(k) for k in args.recalls.split(',')]
    except ValueError:
        parser.error(f'--recalls expects comma-separated integers like 1,2,4,8, got {args.recalls!r}')
    if args.metrics is not None:
        args.metrics = args.metrics.split(',')
        if not set(args.metrics) <= set(METRICS):
            parser.error(f'--metrics expects a comma-separated subset of {",".join(METRICS)}, got {",".join(args.metrics)}')
    args.device = resolve_device(args.device)
    if args.amp == 'fp16' and args.device != 'cuda':  # CPUs run fp16 convolutions without hardware support
        parser.error('--amp fp16 is for CUDA (on CPUs it runs about 20x slower than fp32); '
                     'on the CPU use --amp bf16 or none')
    return args


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


def memory_format(device):
    # channels-last feeds the tensor cores of convolutions on GPUs; on the CPU it does not pay
    return torch.channels_last if device.type == 'cuda' else torch.contiguous_format


def build_optimizer(model, loss_fn, args):
    # the recipe of the proxy-based methods: AdamW, proxies learning 100x faster (step decay in main)
    return torch.optim.AdamW([{'params': model.parameters(), 'lr': args.lr},
                              {'params': loss_fn.parameters(), 'lr': args.proxy_lr}],
                             weight_decay=args.weight_decay)


def build_loader(images, labels, transform, train, args, device, rank=0, world_size=1):
    """The DataLoader of this rank's share: shuffled and cut to whole batches for training,
    strided shards in order (for embed()) otherwise."""
    dataset = ImageDataset(images, labels, transform)
    if train:  # a new order per epoch (set_epoch), each rank its disjoint share
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


@torch.no_grad()
def embed(network, loader, world_size=1, amp_dtype=None, desc='embed', progress=True):
    """Embeddings of every image of the loader's dataset, in dataset order, each computed once.

    With several ranks, rank r's loader holds images r, r + world_size, ... (a strided shard: no
    padding duplicates, unlike DistributedSampler); the shards are gathered back into order.
    """
    network.eval()
    device = next(network.parameters()).device
    dataset_size = len(loader.dataset)
    shard = []
    for images, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            shard.append(network(images.to(device, non_blocking=True, memory_format=memory_format(device))).float())
    shard = torch.cat(shard) if shard else torch.empty(0, network.refactor.out_features, device=device)
    if world_size == 1:
        return shard
    # all_gather wants equal sizes: pad every shard to the longest, then cut the padding off
    longest = math.ceil(dataset_size / world_size)
    padded = torch.cat([shard, shard.new_zeros(longest - len(shard), shard.shape[1])])
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    embeddings = shard.new_empty(dataset_size, shard.shape[1])
    for rank, part in enumerate(gathered):
        embeddings[rank::world_size] = part[:len(range(rank, dataset_size, world_size))]
    return embeddings


def all_finite(loss, world_size):
    """Whether the loss is finite on every rank: all ranks must stop at the same step, or the
    others would wait forever for the one that left."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def sync_buffers(model, world_size):
    """Each rank's BatchNorm statistics follow its own batches; rank 0's are the ones saved, so
    every rank embeds with them too (DDP itself broadcasts them before each training forward)."""
    if world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def train_epoch(trainer, loader, optimizer, scaler, epoch, args, world_size, progress):
    trainer.train()
    device = next(trainer.parameters()).device
    predict = trainer.module.loss_fn.predict if world_size > 1 else trainer.loss_fn.predict
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f'train {epoch}/{args.num_epochs}', dynamic_ncols=True, disable=not progress)
    for images, labels in bar:
        images = images.to(device, non_blocking=True, memory_format=memory_format(device))
        labels = labels.to(device, non_blocking=True)
        loss, embeddings = trainer(images, labels)
        if not all_finite(loss, world_size):
            raise FloatingPointError(f'the loss became {loss.item()} in epoch {epoch}')
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16: scaled so small gradients do not flush to zero
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(labels)
        correct += (predict(embeddings) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f'{total_loss / seen:.4f}', acc=f'{100 * correct / seen:.2f}%')
    totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=device)
    if world_size > 1:  # the epoch's numbers over every rank's share
        dist.all_reduce(totals)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, args):
    """The checkpoint at `path`, checked to come from a run with the same defining arguments."""
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'--resume {path}: no such checkpoint') from None
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise ValueError(f'--resume {path}: not a readable checkpoint ({type(e).__name__}: {e})') from None
    expected = {'model', 'loss', 'optimizer', 'scheduler', 'scaler', 'epoch', 'statistics', 'args'}
    if not isinstance(checkpoint, dict) or not expected <= set(checkpoint):
        raise ValueError(f'--resume {path}: not a checkpoint written by train.py')
    differences = [f'--{key} {checkpoint["args"].get(key)!r} there, {getattr(args, key)!r} now'
                   for key in RUN_DEFINING if checkpoint['args'].get(key) != getattr(args, key)]
    if differences:
        raise ValueError(f'--resume {path} belongs to another run: ' + '; '.join(differences))
    return checkpoint


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed(args)
    is_main = rank == 0  # only rank 0 prints, writes files and plots
    torch.manual_seed(args.seed)  # the same initial network on every rank

    # data: proxies and labels index the sorted class names of each split
    splits = load_splits(args.data_path, args.data_name, args.crop, args.max_size)
    train_classes = sorted(splits['train'])
    train_images, train_labels = flatten_split(splits['train'], train_classes)
    # the test images are the gallery; In-shop also has separate queries (query -> gallery)
    gallery = splits.get('gallery', splits.get('test'))
    test_classes = sorted(set(gallery) | set(splits.get('query', {})))
    test_images, test_labels = flatten_split(gallery, test_classes)
    query_images, query_labels = flatten_split(splits['query'], test_classes) if 'query' in splits else ([], [])
    if args.metrics is None:
        args.metrics = [m for m in METRICS if m != 'nmi' or len(test_classes) <= NMI_MAX_CLASSES]

    model = Model(args.backbone_type, args.feature_dim, args.pretrained, args.pooling, args.freeze_bn).to(device)
    model = model.to(memory_format=memory_format(device))
    network = torch.compile(model) if args.compile else model
    amp_dtype = AMP_DTYPES[args.amp]
    train_transform, test_transform = build_transforms(model.backbone_spec, args.image_size)
    loader = functools.partial(build_loader, args=args, device=device, rank=rank, world_size=world_size)
    train_loader = loader(train_images, train_labels, train_transform, train=True)
    if len(train_loader) == 0:
        raise ValueError(f'--batch_size {args.batch_size} is larger than the {len(train_images)} training images')
    test_loader = loader(test_images, test_labels, test_transform, train=False)
    query_loader = loader(query_images, query_labels, test_transform, train=False)
    # train embeddings go into the feature database: unaugmented, like the test set
    train_eval_loader = loader(train_images, train_labels, test_transform, train=False)

    loss_fn = build_loss(args.loss_name, len(train_classes), args.feature_dim, args.scale).to(device)
    trainer = ProxyTraining(network, loss_fn, amp_dtype)
    if world_size > 1:
        trainer = DistributedDataParallel(trainer, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = build_optimizer(model, loss_fn, args)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    name = os.path.join(args.output_dir, run_name(args))
    statistics, first_epoch = [], 0
    resume = f'{name}_checkpoint.pth' if args.resume == 'auto' else args.resume
    if args.resume == 'auto' and not os.path.exists(resume):
        resume = None
        if is_main:
            print(f'--resume auto: no checkpoint {name}_checkpoint.pth yet, starting from epoch 0')
    if resume:
        checkpoint = load_checkpoint(resume, args)
        model.load_state_dict(checkpoint['model'])
        loss_fn.load_state_dict(checkpoint['loss'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        scaler.load_state_dict(checkpoint['scaler'])
        statistics, first_epoch = checkpoint['statistics'], checkpoint['epoch'] + 1
        if is_main:
            print(f'resuming from {resume} after epoch {checkpoint["epoch"]}')
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with atomic_path(f'{name}_args.json') as tmp, open(tmp, 'w') as f:
            json.dump(vars(args), f, indent=2)
        print(f'{args.data_name}: {len(train_classes)} train classes / {len(train_images)} images, '
              f'{len(test_classes)} test classes / {len(test_images)} images; {args.backbone_type} on {device}'
              + (f' x {world_size} processes' if world_size > 1 else ''))

    for epoch in range(first_epoch, args.num_epochs + 1):
        start = time.time()
        # every epoch's randomness (augmentations, worker seeds) follows from (seed, epoch) alone,
        # so resuming after epoch e replays epoch e + 1 exactly
        torch.manual_seed(args.seed * 1_000_003 + epoch)
        train_loader.sampler.set_epoch(epoch)
        if epoch == 0:  # the untrained network, as the baseline every epoch is compared with
            loss, accuracy = math.nan, math.nan
        else:
            try:
                loss, accuracy = train_epoch(trainer, train_loader, optimizer, scaler, epoch, args, world_size, is_main)
            except FloatingPointError as e:
                sys.exit(f'error: {e}; stopping. The files of epoch {epoch - 1} are kept in {args.output_dir}/. '
                         f'A lower --lr or --proxy_lr may help.')
            scheduler.step()
            sync_buffers(model, world_size)
        test_embeddings = embed(network, test_loader, world_size, amp_dtype, 'embed test set', is_main)
        if query_images:
            query_embeddings = embed(network, query_loader, world_size, amp_dtype, 'embed queries', is_main)
            metrics = evaluate(query_embeddings, query_labels, args.recalls, test_embeddings, test_labels, args.metrics)
        else:
            metrics = evaluate(test_embeddings, test_labels, args.recalls, metrics=args.metrics)
        statistics.append({'epoch': epoch, 'loss': loss, 'accuracy': accuracy, **metrics})
        database = {'test_images': test_images, 'test_labels': test_labels, 'test_classes': test_classes,
                    'test_embeddings': test_embeddings.cpu(), 'proxies': loss_fn.proxies.detach().cpu(),
                    'train_classes': train_classes, 'epoch': epoch, 'args': vars(args)}
        if query_images:
            database.update(query_images=query_images, query_labels=query_labels,
                            query_embeddings=query_embeddings.cpu())
        if epoch == args.num_epochs:  # one extra pass, so only for the final model
            database.update(train_images=train_images, train_labels=train_labels,
                            train_embeddings=embed(network, train_eval_loader, world_size, amp_dtype,
                                                   'embed train set', is_main).cpu())
        if not is_main:
            continue
        print(f'epoch {epoch}/{args.num_epochs}  loss {loss:.4f}  acc {100 * accuracy:.2f}%  '
              + '  '.join(f'{metric.replace("recall@", "R@")} {100 * value:.2f}%' for metric, value in metrics.items())
              + f'  ({time.time() - start:.0f}s)')
        table = pd.DataFrame(statistics)
        with atomic_path(f'{name}_statistics.csv') as tmp:
            table.to_csv(tmp, index=False)
        plot_statistics(table, f'{name}_results.png')
        save({'model': model.state_dict(), 'proxies': loss_fn.state_dict(), 'epoch': epoch, 'args': vars(args)},
             f'{name}_model.pth')
        save(database, f'{name}_data_base.pth')
        # written last: a checkpoint on disk means every other file of its epoch is there too
        save({'model': model.state_dict(), 'loss': loss_fn.state_dict(), 'optimizer': optimizer.state_dict(),
              'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(), 'epoch': epoch,
              'statistics': statistics, 'args': vars(args)}, f'{name}_checkpoint.pth')

    if is_main and first_epoch <= args.num_epochs:
        # once, from the final test embeddings in hand: t-SNE takes seconds, too long for every epoch
        plot_embedding_map(test_embeddings, test_labels, test_classes, f'{name}_embedding_map.png')
        print(f'saved {name}_{{statistics.csv,results.png,results.pdf,embedding_map.png,embedding_map.pdf,'
              f'model.pth,data_base.pth,checkpoint.pth,args.json}}')
    elif is_main:
        print(f'{resume} is already past the last epoch ({args.num_epochs}); nothing to do')
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
