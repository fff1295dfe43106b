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
    """{class_name: [paths]} -> (paths, label indices into class_names); absent classes add nothing."""
    paths, labels = [], []
    for index, name in enumerate(class_names):
        paths += split.get(name, [])
        labels += [index] * len(split.get(name, []))
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
# retrieval metrics

METRICS = ('recall', 'map@r', 'r_precision', 'nmi')
INDEX_BITS = 32  # a gallery index fits in the low half of a 64-bit sort key


def similarity_keys(similarities, indices):
    """Exact int64 sort keys: higher similarity first, then lower gallery index.

    The float32 bits map monotonically onto int32 (negative floats have their magnitude bits
    flipped) and the index fills the low bits, so keys never tie: topk over them is exact
    and deterministic.
    """
    bits = similarities.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << INDEX_BITS) | ((1 << INDEX_BITS) - 1 - indices)


def key_indices(keys):
    return (1 << INDEX_BITS) - 1 - (keys & ((1 << INDEX_BITS) - 1))


def tile_top_keys(similarities, k, first, dim=1):
    """Keys of the k best gallery items for each query of a similarity tile whose gallery axis
    is `dim` (0 serves the transposed tile without copying it); the gallery starts at `first`."""
    n = similarities.shape[dim]
    values, columns = similarities.topk(min(k + 1, n), dim=dim)
    if dim == 0:
        values, columns = values.t(), columns.t()
    keys = similarity_keys(values[:, :k], columns[:, :k] + first)
    if n > k:
        # topk picks arbitrarily among equal values: where the (k+1)-th equals the k-th, a tie
        # crosses the boundary, and the row is redone with keys over the whole tile (exact, slower)
        tied = values[:, k - 1] == values[:, k]
        if tied.any():
            rows = similarities[tied] if dim == 1 else similarities[:, tied].t()
            all_columns = torch.arange(first, first + n, device=similarities.device)
            keys[tied] = similarity_keys(rows, all_columns).topk(k, dim=1).values
    return keys


def nearest_neighbours(queries, gallery, k, same_set, block_bytes):
    """Gallery indices [queries, k] of the k most similar items, best first, ties to the lower
    index; with same_set the gallery is the queries, and a query skips itself.

    Similarities come in square tiles with a running top-k per query, so the memory beyond the
    embeddings and the result is about block_bytes, whatever N.
    """
    tile = max(k + 1, int((block_bytes / 32) ** 0.5))  # a float32 tile and topk's working memory
    best = torch.full((len(queries), k), torch.iinfo(torch.int64).min, dtype=torch.int64, device=queries.device)

    def merge(first, keys):
        rows = slice(first, first + len(keys))
        best[rows] = torch.cat([best[rows], keys], dim=1).topk(k, dim=1).values

    for q in range(0, len(queries), tile):
        # a query set against itself is symmetric: tile (q, g) also serves as (g, q), a third less work
        for g in range(q if same_set else 0, len(gallery), tile):
            similarities = queries[q:q + tile] @ gallery[g:g + tile].t()
            if same_set and g == q:
                similarities.fill_diagonal_(float('-inf'))
            merge(q, tile_top_keys(similarities, k, g))
            if same_set and g != q:
                merge(g, tile_top_keys(similarities, k, q, dim=0))
    return key_indices(best)


def as_label_tensor(labels, name, n, device):
    labels = torch.as_tensor(labels, device=device)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f'{name} must hold one label per embedding: got shape {tuple(labels.shape)} for {n} embeddings')
    return labels


def check_embeddings(embeddings, name):
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f'{name} must be a non-empty [N, D] tensor, got shape {tuple(embeddings.shape)}')
    if not torch.isfinite(embeddings).all():
        bad = (~torch.isfinite(embeddings)).any(dim=1).sum().item()
        raise ValueError(f'{name}: {bad} of {len(embeddings)} embeddings hold NaN or inf')


def retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks, metrics, same_set, block_bytes):
    # R of each query: how many gallery items share its class (itself not counted)
    classes, inverse = torch.unique(torch.cat([query_labels, gallery_labels]), return_inverse=True)
    query_classes, gallery_classes = inverse[:len(query_labels)], inverse[len(query_labels):]
    relevant = torch.bincount(gallery_classes, minlength=len(classes))[query_classes] - int(same_set)
    # A query alone in its class has nothing to find: its R-Precision is undefined (0 / 0), so
    # it is left out of every retrieval metric, as pytorch-metric-learning's AccuracyCalculator does.
    answerable = relevant > 0
    if not answerable.any():
        raise ValueError('no query has another image of its class in the gallery')
    k = max(max(ks), relevant.max().item())
    neighbours = nearest_neighbours(queries, gallery, k, same_set, block_bytes)
    sums = torch.zeros(len(ks) + 2, dtype=torch.float64, device=queries.device)
    block = max(1, block_bytes // (16 * k))
    for start in range(0, len(queries), block):
        rows = slice(start, start + block)
        ok = answerable[rows]
        matches = (gallery_classes[neighbours[rows]] == query_classes[rows, None])[ok]
        r = relevant[rows][ok].double()
        for i, kk in enumerate(ks):
            sums[i] += matches[:, :kk].any(dim=1).sum()
        within_r = matches & (torch.arange(k, device=matches.device) < r[:, None])
        sums[-2] += (within_r.sum(dim=1) / r).sum()
        precision_at_i = matches.cumsum(dim=1).double() / torch.arange(1, k + 1, device=matches.device)
        sums[-1] += ((precision_at_i * within_r).sum(dim=1) / r).sum()
    means = (sums / answerable.sum()).tolist()
    results = {f'recall@{kk}': means[i] for i, kk in enumerate(ks)} if 'recall' in metrics else {}
    if 'r_precision' in metrics:
        results['r_precision'] = means[-2]
    if 'map@r' in metrics:
        results['map@r'] = means[-1]
    return results


def kmeans_plus_plus(x, k, generator):
    """k-means++ seeding: each new centre drawn with probability proportional to squared distance."""
    squared_norms = (x ** 2).sum(dim=1)

    def squared_distances(index):  # a matrix-vector product: cheap even for many centres
        return squared_norms + squared_norms[index] - 2 * x @ x[index]
    centres = [torch.randint(len(x), (1,), generator=generator).item()]
    distances = squared_distances(centres[0])
    for _ in range(k - 1):
        weights = distances.clamp(min=0).double().cpu()
        centres.append(torch.multinomial(weights, 1, generator=generator).item() if weights.sum() > 0
                       else torch.randint(len(x), (1,), generator=generator).item())  # all points taken
        distances = torch.minimum(distances, squared_distances(centres[-1]))
    return x[centres].clone()


def kmeans(x, k, seed=0, iterations=20, block_bytes=1 << 28):
    """Lloyd's k-means from k-means++ seeds (fixed seed); returns the cluster of each row."""
    centres = kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed))
    block = max(1, block_bytes // (8 * k))
    for _ in range(iterations):
        # nearest centre by squared distance, up to the per-row constant |x|^2
        assignment = torch.cat([(2 * x[i:i + block] @ centres.t() - (centres ** 2).sum(dim=1)).argmax(dim=1)
                                for i in range(0, len(x), block)])
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return assignment


def entropy(counts):
    p = counts.double() / counts.sum()
    return -(p * p.log()).sum()


def nmi(labels, clusters):
    """Normalised mutual information, arithmetic normalisation (scikit-learn's default)."""
    _, labels = torch.unique(labels, return_inverse=True)
    _, clusters = torch.unique(clusters, return_inverse=True)
    # the contingency table is sparse when classes are many (SOP): count the pairs that occur
    pairs, joint = torch.unique(labels * (clusters.max() + 1) + clusters, return_counts=True)
    n = len(labels)
    label_counts, cluster_counts = torch.bincount(labels), torch.bincount(clusters)
    a, b = pairs // (clusters.max() + 1), pairs % (clusters.max() + 1)
    mutual = (joint.double() / n * (joint.double() * n / (label_counts[a] * cluster_counts[b]).double()).log()).sum()
    h = entropy(label_counts) + entropy(cluster_counts)
    return 1.0 if h == 0 else (2 * mutual / h).item()


def evaluate(embeddings, labels, ks=(1, 2, 4, 8), gallery=None, gallery_labels=None, metrics=METRICS,
             block_bytes=1 << 28):
    """Retrieval metrics of L2-normalised embeddings (cosine similarity), as fractions in [0, 1].

    Every embedding queries the others, or, given a gallery, the gallery (query->gallery
    protocols such as In-shop). Keys, for the metrics asked for: recall@K for each K (a
    same-class item among the K nearest), r_precision and map@r (Musgrave et al., ECCV 2020),
    and nmi (k-means with one cluster per class, seed 0, against the labels; on the queries).
    Neighbours are exact: highest similarity first, ties to the lower gallery index. Memory
    is bounded by block_bytes (plus the embeddings), never N x N.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f'unknown metrics {sorted(unknown)}; choose from {METRICS}')
    check_embeddings(embeddings, 'embeddings')
    embeddings = embeddings.float()  # similarities in float32, whatever precision the model ran in
    labels = as_label_tensor(labels, 'labels', len(embeddings), embeddings.device)
    same_set = gallery is None
    if same_set:
        gallery, gallery_labels = embeddings, labels
    else:
        check_embeddings(gallery, 'gallery')
        gallery = gallery.float()
        gallery_labels = as_label_tensor(gallery_labels, 'gallery_labels', len(gallery), gallery.device)
        if gallery.shape[1] != embeddings.shape[1]:
            raise ValueError(f'query and gallery embeddings differ in size: {embeddings.shape[1]} vs {gallery.shape[1]}')
    candidates = len(gallery) - int(same_set)
    if not ks or min(ks) < 1 or max(ks) > candidates:
        raise ValueError(f'Recall@K needs 1 <= K <= {candidates} (the gallery size{" minus the query" * same_set}), '
                         f'got K = {list(ks)}')
    results = {}
    if {'recall', 'map@r', 'r_precision'} & set(metrics):
        results.update(retrieval_metrics(embeddings, labels, gallery, gallery_labels, ks, metrics, same_set,
                                         block_bytes))
    if 'nmi' in metrics:
        num_classes = len(torch.unique(labels))
        results['nmi'] = nmi(labels, kmeans(embeddings, num_classes, block_bytes=block_bytes))
    return results


def recall(embeddings, labels, ks):
    """Recall@K for each K in ks, as a list of fractions."""
    results = evaluate(embeddings, labels, ks, metrics=('recall',))
    return [results[f'recall@{k}'] for k in ks]

# -----------------------------------------------------------------------------
# plots


def plot_statistics(statistics, path):
    """Loss/accuracy and every retrieval metric of a run's statistics table, per epoch."""
    metrics = [c for c in statistics.columns if c not in ('epoch', 'loss', 'accuracy')]
    with plt.style.context(['science', 'no-latex']):
        fig, (ax_loss, ax_metrics) = plt.subplots(1, 2, figsize=(7, 2.8))
        ax_loss.plot(statistics['epoch'], statistics['loss'], marker='.', label='loss')
        ax_loss.set(xlabel='epoch', ylabel='training loss')
        ax_acc = ax_loss.twinx()
        ax_acc.plot(statistics['epoch'], 100 * statistics['accuracy'], marker='.', color='C1', label='accuracy')
        ax_acc.set_ylabel('proxy accuracy (%)')
        handles = ax_loss.get_lines() + ax_acc.get_lines()
        ax_loss.legend(handles, [h.get_label() for h in handles], loc='center right', frameon=False)
        for column in metrics:
            ax_metrics.plot(statistics['epoch'], 100 * statistics[column], marker='.', label=column.replace('recall', 'R'))
        ax_metrics.set(xlabel='epoch', ylabel='test metric (%)')
        ax_metrics.legend(frameon=False, fontsize=6, ncol=2)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=200)
        plt.close(fig)
