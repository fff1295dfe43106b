"""What train.py and test.py share: atomic writes, run file names, images and transforms,
the retrieval metric, and the training plot."""
import contextlib
import os

import matplotlib
matplotlib.use('Agg')  # figures go to files; no display needed
import matplotlib.pyplot as plt
import scienceplots  # noqa: F401  (registers the 'science' matplotlib styles)
import torch
import torchvision.transforms as T
from PIL import Image


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename.

    A crash mid-write leaves the previous file intact. The temporary name keeps the
    extension so writers that infer the format from it (matplotlib) still work.
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.tmp-{os.getpid()}-{name}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_name(args):
    """Prefix of every file a run writes, e.g. car_resnet50_positive_proxy_512_20."""
    return f'{args.data_name}_{args.backbone_type}_{args.loss_name}_{args.feature_dim}_{args.num_epochs}'

# -----------------------------------------------------------------------------
# images


def read_rgb(path):
    # convert() decodes every pixel, so a truncated file fails here and not mid-epoch
    with Image.open(path) as img:
        return img.convert('RGB')


class ImageDataset(torch.utils.data.Dataset):

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(read_rgb(self.paths[index])), self.labels[index]


def flatten_split(split, class_names):
    """{class_name: [paths]} -> (paths, label indices into class_names)."""
    paths, labels = [], []
    for index, name in enumerate(class_names):
        paths += split[name]
        labels += [index] * len(split[name])
    return paths, labels


class ToBGR255:
    """Caffe-style input (BN-Inception): RGB 0-1 tensor -> BGR 0-255."""

    def __call__(self, image):
        return image[[2, 1, 0]] * 255


def build_transforms(backbone_spec, image_size):
    """Train and test transforms in the input convention of the backbone's weights."""
    to_input = [T.ToTensor(), *([ToBGR255()] if backbone_spec.bgr_255 else []),
                T.Normalize(backbone_spec.mean, backbone_spec.std)]
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *to_input])
    # the usual 256 -> 224 resize-then-centre-crop ratio, at any size
    test = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), *to_input])
    return train, test

# -----------------------------------------------------------------------------
# retrieval metric


def recall(embeddings, labels, ks, block_size=1024):
    """Recall@K for each K in ks: the fraction of queries with a same-class image among their K
    nearest neighbours (cosine similarity), every image querying all the others.

    Similarities are computed one block of queries at a time, so memory grows as
    block_size x N, never N x N.
    """
    labels = torch.as_tensor(labels, device=embeddings.device)
    n, max_k = len(labels), max(ks)
    if max_k >= n:
        raise ValueError(f'Recall@{max_k} needs more than {max_k} images, got {n}')
    hits = torch.zeros(len(ks), dtype=torch.long, device=embeddings.device)
    for start in range(0, n, block_size):
        queries = embeddings[start:start + block_size]
        similarities = queries @ embeddings.t()
        rows = torch.arange(len(queries), device=embeddings.device)
        similarities[rows, rows + start] = float('-inf')  # a query does not retrieve itself
        neighbours = similarities.topk(max_k, dim=1).indices
        matches = labels[neighbours] == labels[start:start + block_size, None]
        for i, k in enumerate(ks):
            hits[i] += matches[:, :k].any(dim=1).sum()
    return [h / n for h in hits.tolist()]

# -----------------------------------------------------------------------------
# plots


def plot_statistics(statistics, path):
    """Loss/accuracy and every recall@K of a run's statistics table, per epoch."""
    recalls = [c for c in statistics.columns if c.startswith('recall@')]
    with plt.style.context(['science', 'no-latex']):
        fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(7, 2.8))
        ax_loss.plot(statistics['epoch'], statistics['loss'], marker='.', label='loss')
        ax_loss.set(xlabel='epoch', ylabel='training loss')
        ax_acc = ax_loss.twinx()
        ax_acc.plot(statistics['epoch'], 100 * statistics['accuracy'], marker='.', color='C1', label='accuracy')
        ax_acc.set_ylabel('proxy accuracy (%)')
        handles = ax_loss.get_lines() + ax_acc.get_lines()
        ax_loss.legend(handles, [h.get_label() for h in handles], loc='center right', frameon=False)
        for column in recalls:
            ax_recall.plot(statistics['epoch'], 100 * statistics[column], marker='.', label=column.replace('recall', 'R'))
        ax_recall.set(xlabel='epoch', ylabel='test recall (%)')
        ax_recall.legend(frameon=False)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=200)
        plt.close(fig)
