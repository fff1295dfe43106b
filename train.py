"""Train an embedding network with class proxies and evaluate it on the unseen test classes.

    python train.py --data_name cub --backbone_type inception --loss_name normalized_softmax

Every epoch: one pass over the training classes, then Recall@K on the test classes (also
before training, as epoch 0). Files go to --output_dir, named by utils.run_name().
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data_utils import PREPARERS, load_splits
from loss import LOSSES, build_loss
from model import BACKBONES, POOLINGS, Model
from utils import METRICS, ImageDataset, atomic_path, build_transforms, evaluate, flatten_split, plot_statistics, run_name

NMI_MAX_CLASSES = 1000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a proxy-based embedding network for image retrieval.')
    parser.add_argument('--data_path', default='data', help='folder holding one sub-folder per dataset')
    parser.add_argument('--data_name', default='car', choices=list(PREPARERS))
    parser.add_argument('--crop', action='store_true', help='use the bounding-box crops (data_utils.py --crop)')
    parser.add_argument('--backbone_type', default='resnet50', choices=list(BACKBONES))
    parser.add_argument('--pretrained', default='imagenet', help="'imagenet' (from $TORCH_HOME), 'none', or a state dict PATH")
    parser.add_argument('--pooling', default='max', choices=list(POOLINGS))
    parser.add_argument('--no_freeze_bn', dest='freeze_bn', action='store_false',
                        help='let BatchNorm statistics of a pretrained backbone train')
    parser.add_argument('--loss_name', default='positive_proxy', choices=list(LOSSES))
    parser.add_argument('--feature_dim', type=int, default=512)
    parser.add_argument('--scale', type=float, default=32.0, help='softmax temperature: logits = scale * cosine')
    parser.add_argument('--batch_size', type=int, default=64)
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
    parser.add_argument('--num_workers', type=int, default=min(8, os.cpu_count()), help='data loading processes')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output_dir', default='results')
    args = parser.parse_args(argv)
    try:
        args.recalls = [int(k) for k in args.recalls.split(',')]
    except ValueError:
        parser.error(f'--recalls expects comma-separated integers like 1,2,4,8, got {args.recalls!r}')
    if args.metrics is not None:
        args.metrics = args.metrics.split(',')
        if not set(args.metrics) <= set(METRICS):
            parser.error(f'--metrics expects a comma-separated subset of {",".join(METRICS)}, got {",".join(args.metrics)}')
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    return args


@torch.no_grad()
def embed(model, loader, device, desc):
    model.eval()
    embeddings = [model(images.to(device, non_blocking=True)).float()
                  for images, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)]
    return torch.cat(embeddings)


def train_epoch(model, loss_fn, loader, optimizer, device, epoch, num_epochs):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    progress = tqdm(loader, desc=f'train {epoch}/{num_epochs}', dynamic_ncols=True)
    for images, labels in progress:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        embeddings = model(images)
        loss = loss_fn(embeddings, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f'the loss became {loss.item()} in epoch {epoch}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        correct += (loss_fn.predict(embeddings) == labels).sum().item()
        seen += len(labels)
        progress.set_postfix(loss=f'{total_loss / seen:.4f}', acc=f'{100 * correct / seen:.2f}%')
    return total_loss / seen, correct / seen


def save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)

    # data: proxies and labels index the sorted class names of each split
    splits = load_splits(args.data_path, args.data_name, args.crop)
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
    train_transform, test_transform = build_transforms(model.backbone_spec, args.image_size)
    loader_options = dict(num_workers=args.num_workers, pin_memory=device.type == 'cuda',
                          persistent_workers=args.num_workers > 0)
    train_loader = torch.utils.data.DataLoader(
        ImageDataset(train_images, train_labels, train_transform), batch_size=args.batch_size, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(args.seed), **loader_options)
    if len(train_loader) == 0:
        raise ValueError(f'--batch_size {args.batch_size} is larger than the {len(train_images)} training images')
    test_loader, query_loader = (torch.utils.data.DataLoader(
        ImageDataset(images, labels, test_transform), batch_size=args.batch_size, **loader_options)
        for images, labels in ((test_images, test_labels), (query_images, query_labels)))
    # train embeddings go into the feature database: unaugmented, like the test set
    train_eval_loader = torch.utils.data.DataLoader(
        ImageDataset(train_images, train_labels, test_transform), batch_size=args.batch_size, **loader_options)

    loss_fn = build_loss(args.loss_name, len(train_classes), args.feature_dim, args.scale).to(device)
    # the recipe of the proxy-based methods: AdamW, proxies learning 100x faster, step decay
    optimizer = torch.optim.AdamW([{'params': model.parameters(), 'lr': args.lr},
                                   {'params': loss_fn.parameters(), 'lr': args.proxy_lr}],
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_gamma)

    name = os.path.join(args.output_dir, run_name(args))
    os.makedirs(args.output_dir, exist_ok=True)
    with atomic_path(f'{name}_args.json') as tmp, open(tmp, 'w') as f:
        json.dump(vars(args), f, indent=2)
    print(f'{args.data_name}: {len(train_classes)} train classes / {len(train_images)} images, '
          f'{len(test_classes)} test classes / {len(test_images)} images; {args.backbone_type} on {device}')

    statistics = []
    for epoch in range(args.num_epochs + 1):
        start = time.time()
        if epoch == 0:  # the untrained network, as the baseline every epoch is compared with
            loss, accuracy = math.nan, math.nan
        else:
            try:
                loss, accuracy = train_epoch(model, loss_fn, train_loader, optimizer, device, epoch, args.num_epochs)
            except FloatingPointError as e:
                sys.exit(f'error: {e}; stopping. The files of epoch {epoch - 1} are kept in {args.output_dir}/. '
                         f'A lower --lr or --proxy_lr may help.')
            scheduler.step()
        test_embeddings = embed(model, test_loader, device, 'embed test set')
        if query_images:
            query_embeddings = embed(model, query_loader, device, 'embed queries')
            metrics = evaluate(query_embeddings, query_labels, args.recalls, test_embeddings, test_labels, args.metrics)
        else:
            metrics = evaluate(test_embeddings, test_labels, args.recalls, metrics=args.metrics)
        statistics.append({'epoch': epoch, 'loss': loss, 'accuracy': accuracy, **metrics})
        print(f'epoch {epoch}/{args.num_epochs}  loss {loss:.4f}  acc {100 * accuracy:.2f}%  '
              + '  '.join(f'{metric.replace("recall@", "R@")} {100 * value:.2f}%' for metric, value in metrics.items())
              + f'  ({time.time() - start:.0f}s)')

        table = pd.DataFrame(statistics)
        with atomic_path(f'{name}_statistics.csv') as tmp:
            table.to_csv(tmp, index=False)
        plot_statistics(table, f'{name}_results.png')
        save({'model': model.state_dict(), 'proxies': loss_fn.state_dict(), 'epoch': epoch, 'args': vars(args)},
             f'{name}_model.pth')
        database = {'test_images': test_images, 'test_labels': test_labels, 'test_classes': test_classes,
                    'test_embeddings': test_embeddings.cpu(), 'proxies': loss_fn.proxies.detach().cpu(),
                    'train_classes': train_classes, 'epoch': epoch, 'args': vars(args)}
        if query_images:
            database.update(query_images=query_images, query_labels=query_labels,
                            query_embeddings=query_embeddings.cpu())
        if epoch == args.num_epochs:  # one extra pass, so only for the final model
            database.update(train_images=train_images, train_labels=train_labels,
                            train_embeddings=embed(model, train_eval_loader, device, 'embed train set').cpu())
        save(database, f'{name}_data_base.pth')
    print(f'saved {name}_{{statistics.csv,results.png,model.pth,data_base.pth,args.json}}')


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
