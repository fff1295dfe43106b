"""Query the feature database that train.py saved: retrieve the K test images most similar
to a query test image and write them, framed green (same class) or red (other class).

    python test.py --data_base results/car_resnet50_positive_proxy_512_20_data_base.pth \
                   --query_img_name data/car/car_ims/008055.jpg --retrieval_num 8
"""
import argparse
import glob
import os
import sys

import matplotlib.pyplot as plt
import torch
from PIL import ImageOps

from utils import atomic_path, read_rgb

GREEN, RED, GREY = (0, 160, 0), (210, 0, 0), (150, 150, 150)


def load_database(path):
    try:
        database = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'--data_base {path} does not exist; train.py writes it to --output_dir') from None
    except Exception as e:  # not a torch file, truncated, or holding non-tensor objects
        raise ValueError(f'--data_base {path} is not a readable feature database ({type(e).__name__}: {e})') from None
    missing = {'test_images', 'test_labels', 'test_classes', 'test_embeddings'} - set(database)
    if missing:
        raise ValueError(f'--data_base {path} is not a feature database written by train.py: missing {sorted(missing)}')
    return database


def retrieve(database, query_index, k):
    """The k gallery images most similar to the query (itself excluded): (indices, similarities)."""
    embeddings = database['test_embeddings']
    if not 1 <= k < len(embeddings):
        raise ValueError(f'--retrieval_num {k}: the gallery holds {len(embeddings) - 1} other images')
    similarities = embeddings @ embeddings[query_index]
    similarities[query_index] = float('-inf')
    top = similarities.topk(k)
    return top.indices.tolist(), top.values.tolist()


def find_query(database, query):
    paths = [os.path.normpath(os.path.abspath(p)) for p in database['test_images']]
    try:
        return paths.index(os.path.normpath(os.path.abspath(query)))
    except ValueError:
        raise ValueError(f'--query_img_name {query} is not among the {len(paths)} test images of the database '
                         f'(e.g. {database["test_images"][0]})') from None


def framed(path, colour, size=224):
    image = read_rgb(path)
    image.thumbnail((size, size))
    return ImageOps.expand(image, border=max(2, size // 28), fill=colour)


def save_grid(query, results, path):
    """One figure: the query, then each result with rank, similarity and class."""
    tiles = [(query[0], f'query\n{query[1]}')] + results
    fig, axes = plt.subplots(1, len(tiles), figsize=(1.8 * len(tiles), 2.3))
    for ax, (image, title) in zip(axes, tiles):
        ax.imshow(image)
        ax.set_title(title, fontsize=7)
        ax.axis('off')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Retrieve the test images most similar to a query image.')
    parser.add_argument('--query_img_name', default='data/car/car_ims/008055.jpg', help='a test image of the database')
    parser.add_argument('--data_base', default='results/car_resnet50_positive_proxy_512_20_data_base.pth',
                        help='feature database written by train.py')
    parser.add_argument('--retrieval_num', type=int, default=8, help='how many images to retrieve')
    parser.add_argument('--output_dir', default='results')
    args = parser.parse_args(argv)

    database = load_database(args.data_base)
    query_index = find_query(database, args.query_img_name)
    indices, similarities = retrieve(database, query_index, args.retrieval_num)

    images, labels, classes = database['test_images'], database['test_labels'], database['test_classes']
    query_label = labels[query_index]
    # parent folder + file name: unique for CUB/Cars/synthetic layouts (class folder or car_ims)
    parent, file_name = os.path.split(os.path.normpath(args.query_img_name))
    out_dir = os.path.join(args.output_dir, f'{os.path.basename(parent)}_{os.path.splitext(file_name)[0]}')
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, 'retrieval_img_*.jpg')):  # an earlier query's results
        os.remove(stale)
    query_image = framed(images[query_index], GREY)
    query_image.save(os.path.join(out_dir, 'query_img.jpg'))
    results = []
    for rank, (index, similarity) in enumerate(zip(indices, similarities), 1):
        image = framed(images[index], GREEN if labels[index] == query_label else RED)
        image.save(os.path.join(out_dir, f'retrieval_img_{rank}_{similarity:.4f}.jpg'))
        results.append((image, f'#{rank}  {similarity:.3f}\n{classes[labels[index]]}'))
    save_grid((query_image, classes[query_label]), results, os.path.join(out_dir, 'grid.png'))
    correct = sum(labels[i] == query_label for i in indices)
    print(f'{correct}/{len(indices)} retrieved images share the query class {classes[query_label]!r}; '
          f'written to {out_dir}/ (grid.png)')


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
