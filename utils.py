"""What the scripts share, in five sections:

- files and runs: atomic writes, downloads, the one loader of torch files, run names, the --device flag,
  the error tail of every script;
- images and transforms;
- the feature database that train.py writes and test.py and report.py read;
- evaluation: exact Recall@K, MAP@R, R-Precision and NMI;
- figures of runs: the ones train.py draws after a run, and the pieces report.py draws with.

It is the ground floor: the scripts import it, and it imports none of them, not even inside a
function (tests/test_layout.py holds it to that). Its old command line went to scripts of their
own, python report.py plot|table|map|structure and python export.py; a sixth and last section
makes `python utils.py ...` say so and stop.

The plotting stack (matplotlib, SciencePlots, pandas) is imported only where a figure is made,
so that data_utils.py and test.py start without it.
"""
import argparse
import contextlib
import copy
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import shlex
import sys
import zipfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torchvision.io
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

# -----------------------------------------------------------------------------
# files and runs


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


def save_torch_file(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def why_not_loaded(path, error):
    """What torch.load's `error` on `path` means, in a few words: torch's own message is cryptic, or runs
    to paragraphs of advice that does not apply."""
    if isinstance(error, OSError):
        return f'it cannot be read ({error.strerror or error})'
    if not zipfile.is_zipfile(path):  # what torch.save writes is a zip archive
        return 'it is not a file that torch.save writes (another kind of file, or one cut short)'
    if isinstance(error, pickle.UnpicklingError):  # weights_only loads tensors and plain data, nothing else
        return 'it holds Python objects besides tensors and plain data, which are not loaded (they could run code)'
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f'it is damaged ({first_line[:100]})'


def load_torch_file(path, what, required_keys=(), writer='train.py', not_found=None):
    """The dict that torch.save wrote to `path`, loaded safely (weights_only) on the CPU and
    checked to hold required_keys. Every failure is one short error naming the file:
    FileNotFoundError (`not_found`, or a default message), else ValueError."""
    try:
        contents = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(not_found or f'{path}: no such {what}') from None
    except Exception as e:  # unpickling, zip and index errors, or objects weights_only refuses; all cryptic
        raise ValueError(f'{path}: not a {what} written by {writer}: {why_not_loaded(path, e)}') from None
    if not isinstance(contents, dict):
        contents_keys, held = {}, f'; it holds a {type(contents).__name__}'
    else:
        contents_keys, held = contents, ''
    missing = [key for key in required_keys if key not in contents_keys]
    if missing or held:
        raise ValueError(f'{path}: not a {what} written by {writer}: '
                         + (f'no {", ".join(missing)}' if missing else 'not a dict') + held)
    return contents


# torch hub's naming convention: NAME-<the first 8 or more hex digits of the file's sha256>.EXT
HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.')
URL_SCHEMES = ('http://', 'https://')


class DownloadError(ConnectionError):
    """A URL not fetched: offline, unreachable, refused, an HTTP error, or cut short. Callers turn it
    into their own message, saying where the file is expected and what to do instead."""


def is_url(text):
    return str(text).startswith(URL_SCHEMES)


def url_file_name(url):
    """The last part of a URL's path, without its query: .../resnet18-f37072fd.pth?x=1 -> resnet18-f37072fd.pth."""
    return os.path.basename(urllib.parse.urlsplit(url).path)


def name_hash(name):
    """The sha256 prefix that a file name carries by torch hub's convention, or None."""
    match = HASH_IN_NAME.search(name)
    return match.group(1) if match else None


def check_digest(path, algorithm, expected, name=None):
    """ValueError naming the file (`name`, default `path`) unless its `algorithm` digest starts
    with `expected` (a prefix or the whole hex digest; None: nothing to check)."""
    if expected is None:
        return
    with open(path, 'rb') as f:
        digest = hashlib.file_digest(f, algorithm).hexdigest()
    if not digest.startswith(expected.lower()):
        raise ValueError(f'{name or path}: its {algorithm} is {digest}, expected {expected}')


def reachable(url, timeout=5):
    """Whether the server of `url` answers at all (any HTTP status will do) within `timeout` seconds."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method='HEAD'), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, http.client.HTTPException):
        return False
    return True


def fetch(url, path, timeout, progress):
    """Append the rest of `url` to `path` (from its start when it does not exist or the server
    ignores ranges); DownloadError unless every byte the server announced arrived."""
    have = os.path.getsize(path) if os.path.exists(path) else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            have = have if response.status == 206 else 0
            length = response.headers.get('Content-Length')
            expected = have + int(length) if length is not None else None
            with open(path, 'ab' if have else 'wb') as f, \
                    tqdm(total=expected, initial=have, unit='B', unit_scale=True, unit_divisor=1024,
                         desc=url_file_name(url), disable=not progress, dynamic_ncols=True) as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # what is kept is not a prefix of the file (it changed, or is complete)
            os.remove(path)
            return fetch(url, path, timeout, progress)
        raise DownloadError(f'{url}: HTTP {e.code} {e.reason}') from None
    except urllib.error.URLError as e:
        raise DownloadError(f'{url}: {e.reason}') from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, a malformed answer
        raise DownloadError(f'{url}: {type(e).__name__}: {e}') from None
    # read() ends quietly when the server closes early: count the bytes
    if expected is not None and os.path.getsize(path) != expected:
        raise DownloadError(f'{url}: cut short after {os.path.getsize(path)} of {expected} bytes')


def download(url, path, sha256=None, md5=None, resume=False, offline=False, timeout=10, progress=True):
    """Fetch `url` into `path`, with a progress bar, checked and written atomically: a cut download
    never leaves a file under the name `path`. sha256, md5: the digest (or its prefix) the file must
    have; a file without it is deleted and named in a ValueError. resume: keep a cut download as
    PATH.part, which the next call continues (HTTP Range); otherwise the next call starts again.
    offline: fetch nothing. timeout: seconds that connecting, and each read, may wait.
    Network failures raise DownloadError."""
    if offline:
        raise DownloadError(f'{url}: not downloaded (offline)')
    with contextlib.ExitStack() as stack:
        partial = f'{path}.part' if resume else stack.enter_context(atomic_path(path))
        fetch(url, partial, timeout, progress)
        try:
            check_digest(partial, 'sha256', sha256, path)
            check_digest(partial, 'md5', md5, path)
        except ValueError as e:
            if os.path.exists(partial):
                os.remove(partial)
            raise ValueError(f'{e}; downloaded from {url}, deleted') from None
        if resume:
            os.replace(partial, path)
    return path


def run_script(main, argv=None):
    """The tail of every script: bad input, or a missing optional package (faiss, onnx), ends in one
    'error: ...' line, not a traceback."""
    try:
        main(argv)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f'error: {e}')


def choose(registry, key, what):
    """registry[key] of a table (BACKBONES, POOLINGS, LOSSES, ...), or an error listing the choices."""
    if key not in registry:
        raise ValueError(f'unknown {what} {key!r}; choose one of {", ".join(registry)}')
    return registry[key]


def resolve_device(name):
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; asking for 'cuda' without one is an error."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is available')
    return name


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every script's --help: each flag's default after its help, "(default: X)", flags without help
    too, except where there is none to say (None: not set; a switch, which takes no value) or the
    help says it already."""

    @staticmethod
    def says_default(action):
        return not (action.default is None or action.nargs == 0 or 'default' in (action.help or ''))

    def _get_help_string(self, action):
        return super()._get_help_string(action) if self.says_default(action) else action.help

    def _format_action(self, action):
        if not action.help and self.says_default(action):  # argparse shows nothing for a flag without help
            action = copy.copy(action)
            action.help = '(default: %(default)s)'
        return super()._format_action(action)


class Range:
    """An argparse type: a number of `kind` (int or float) from `low` to `high`, the ends included or
    not (`closed`); anything else is refused with the range, after the flag's name (argparse adds it):
    `argument --batch_size: expected an integer >= 1, got '0'`."""

    def __init__(self, kind, low, high=math.inf, closed=True):
        self.kind, self.low, self.high, self.closed = kind, low, high, closed
        noun = 'an integer' if kind is int else 'a number'
        if high == math.inf:
            self.description = f'{noun} {">=" if closed else ">"} {low}'
        else:
            self.description = f'{noun} in {"[" if closed else "("}{low}, {high}{"]" if closed else ")"}'

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        inside = value is not None and (self.low <= value <= self.high if self.closed else self.low < value < self.high)
        if not inside:  # NaN too: it compares false
            raise argparse.ArgumentTypeError(f'expected {self.description}, got {text!r}')
        return value


def add_device_argument(parser):
    """The --device flag of every script; resolve it after parsing with resolve_device."""
    parser.add_argument('--device', default='auto', choices=['auto', 'cuda', 'cpu'], help='auto: CUDA when present')


# the precision autocast runs the network in; the losses keep their fp32 math
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def precision_label(amp):
    """How a resolved --amp value is printed: 'none' is fp32."""
    return 'fp32' if amp == 'none' else amp


def computes_bf16(device):
    """Whether the device has bf16 arithmetic in hardware: a CUDA GPU that supports it natively,
    or a CPU with AVX-512 BF16 or AMX. Elsewhere bf16 is emulated, and slower than fp32."""
    if device == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device == 'cpu' and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def add_amp_argument(parser, auto='bf16 where the device computes bf16 in hardware (CPUs with AVX-512 BF16 or AMX, '
                                   'recent GPUs) and the backbone trains faster in it at this --image_size; fp16 with the '
                                   'gradient scaler on GPUs without bf16 (V100, T4); fp32 elsewhere; the loss stays fp32'):
    """The --amp flag of every script that runs the network, `auto` saying what the default does
    there; resolve it after --device with resolve_amp."""
    parser.add_argument('--amp', default='auto', choices=['auto', *AMP_DTYPES],
                        help=f'precision of the network: auto (the default): {auto}; none (fp32), bf16, '
                             'or fp16 (CUDA only)')


# --amp auto by (device, bf16 in hardware and worth it there): GPUs without bf16 (V100, T4) have fast
# fp16 instead, which trains with the gradient scaler; CPUs compute fp16 without hardware support
AUTO_AMP = {('cuda', True): 'bf16', ('cuda', False): 'fp16', ('cpu', True): 'bf16', ('cpu', False): 'none'}


def resolve_amp(name, device, bf16_pays_on_cpu=True, bf16_in_hardware=None):
    """--amp as run: 'auto' -> AUTO_AMP for `device` (resolved) and whether it computes bf16 in
    hardware (bf16_in_hardware; default: computes_bf16(device)), where on a CPU bf16 counts only if
    the work at hand runs faster in it (bf16_pays_on_cpu)."""
    if name == 'auto':
        in_hardware = computes_bf16(device) if bf16_in_hardware is None else bf16_in_hardware
        return AUTO_AMP[device, in_hardware and (bf16_pays_on_cpu or device != 'cpu')]
    if name == 'fp16' and device != 'cuda':  # CPUs run fp16 convolutions without hardware support
        raise ValueError('--amp fp16 is for CUDA (on CPUs it is many times slower than fp32); '
                         'on the CPU use --amp bf16, auto or none')
    return name


# Arguments that say where a run reads or writes, or how fast it goes, but not what it computes:
# changing them keeps the run's name. Every other argument defines the run.
NOT_RUN_DEFINING = ('data_path', 'output_dir', 'resume', 'num_workers', 'device', 'compile', 'run_name', 'offline',
                    'keep_checkpoint', 'eval_every')
# the readable head of every name: the seed's {data}_{backbone}_{loss}_{dim}_{epochs}
NAME_FIELDS = ('data_name', 'backbone_type', 'loss_name', 'feature_dim', 'num_epochs')


def run_defining(args):
    """{argument: value} of what defines a run: what --resume compares, and what names it."""
    return {key: value for key, value in sorted(vars(args).items()) if key not in NOT_RUN_DEFINING}


def run_name(args, defaults):
    """Prefix of every file a run writes: the seed's readable {data}_{backbone}_{loss}_{dim}_{epochs},
    a short hash of the other defining arguments that differ from their defaults (only when some
    do), and the seed, e.g. car_resnet50_positive_proxy_512_20_seed0 or
    synthetic_resnet18_positive_proxy_512_10_3f09a1_seed1. Runs with other arguments therefore
    never write over each other's files, and runs that differ only in seed differ only in the tail.
    Defaults are compared, not hashed in full, so a new flag with a neutral default renames nothing."""
    changed = {key: value for key, value in run_defining(args).items()
               if key not in NAME_FIELDS and key != 'seed' and value != defaults.get(key)}
    head = '_'.join(str(getattr(args, field)) for field in NAME_FIELDS)
    head = head.replace(os.sep, '-').replace(':', '-')  # a timm:NAME backbone stays one file name
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f'{head}{"_" + digest if changed else ""}_seed{args.seed}'


def stored_run_name(run_args):
    """The run name kept in a saved file's arguments (a dict); files written before names carried
    the hash and the seed have the bare readable head."""
    return run_args.get('run_name') or '_'.join(str(run_args[field]) for field in NAME_FIELDS)


def queries_folder(gallery_file, results='results'):
    """Where test.py writes the queries of a database or gallery index unless told otherwise: a folder
    of its own, named after the file, results/{run}_queries/ for results/{run}_data_base.pth, so that
    the sheets and pages of two databases never mix."""
    return os.path.join(results, f'{run_label(gallery_file)}_queries')

# -----------------------------------------------------------------------------
# images and transforms


# the file extensions Pillow can open: what counts as an image in a folder
IMAGE_EXTENSIONS = frozenset(ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def read_rgb(path):
    """The image file as a PIL RGB image: for drawing, cropping and shrinking copies, and what
    read_image falls back on."""
    # convert() decodes every pixel, so a truncated file fails here and not mid-epoch
    with Image.open(path) as img:
        return img.convert('RGB')


class UnreadableImage(ValueError):
    """An image file that does not decode: the message names the file, `reason` says why."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


JPEG_SIGNATURE = b'\xff\xd8\xff'
# torchvision 0.29 deprecates its image decoders for TorchCodec's, with a warning on every call;
# decode_jpeg still works, and a data loader would print the warning once per worker and epoch
TORCHVISION_DECODERS_DEPRECATED = 'The image decoding and encoding capabilities of TorchVision are deprecated'


def decode_rgb_jpeg(data):
    """uint8 [3, H, W] of a colour JPEG's bytes, decoded by libjpeg-turbo (faster than PIL, and the
    same pixels), or None where PIL should decode: not a JPEG, grayscale or CMYK (which PIL converts
    as it always has), or bytes libjpeg refuses (PIL then says what is wrong)."""
    if not data.startswith(JPEG_SIGNATURE):
        return None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', TORCHVISION_DECODERS_DEPRECATED, DeprecationWarning)
            image = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                               mode=torchvision.io.ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None
    return image if len(image) == 3 else None


def read_image(path):
    """The image file as a uint8 RGB tensor [3, H, W], what the networks take (their Model
    normalises it): JPEGs through libjpeg-turbo, other formats and odd JPEGs through PIL (read_rgb).
    A file that does not decode is an UnreadableImage naming it: here, not mid-batch."""
    with open(path, 'rb') as f:
        image = decode_rgb_jpeg(f.read())
    if image is not None:
        return image
    try:
        # [H, W, 3] seen as [3, H, W]: the layout decode_jpeg returns, which the resizes run fastest on
        return torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1)
    except Exception as e:  # Pillow's errors, by file: OSError, SyntaxError, ValueError, DecompressionBombError...
        reason = f'{type(e).__name__}: {str(e).strip()[:200]}'
        raise UnreadableImage(f'{path}: not a readable image ({reason})', reason) from None


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 image [3, size, size], label) of image files: the workers decode and crop, and send
    uint8, a quarter of float32's bytes; the network normalises on its device (model.InputConvention)."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(read_image(self.paths[index])), self.labels[index]


def flatten_split(split, class_names):
    """{class_name: [paths]} -> (paths, label indices into class_names); absent classes add nothing."""
    paths, labels = [], []
    for index, name in enumerate(class_names):
        paths += split.get(name, [])
        labels += [index] * len(split.get(name, []))
    return paths, labels


def build_transforms(backbone_spec, image_size):
    """Train and test transforms of read_image's uint8 images, to uint8 [3, size, size], with the
    backbone's interpolation and crop fraction (the classic backbones': 224/256). Its mean and std
    are the network's to apply (model.InputConvention). Random draws come from torch's generator,
    which train.py seeds per epoch."""
    interpolation = v2.InterpolationMode(backbone_spec.interpolation)
    train = v2.Compose([v2.RandomResizedCrop(image_size, interpolation=interpolation, antialias=True),
                        v2.RandomHorizontalFlip()])
    test = v2.Compose([v2.Resize(round(image_size / backbone_spec.crop_pct), interpolation=interpolation,
                                 antialias=True), v2.CenterCrop(image_size)])
    return train, test

# -----------------------------------------------------------------------------
# torchrun: the global batch, with its gradient


def distributed_world_size():
    """The number of torchrun processes training together; 1 alone."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GatherWithGradient(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order, the same tensor on every rank. Its backward
    sums the gradients that all ranks send to the gathered rows and returns this rank's slice: with
    every rank computing the same loss L of the global batch, rank r's rows then get
    world_size x dL/d(its rows), which DDP's average of the ranks' network gradients turns into the
    gradient of L: the single-process one. (The proxies' gradients are the same on every rank.)"""

    @staticmethod
    def forward(ctx, rows):
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), len(rows)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: not autograd's buffer
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_rows(rows):
    """Every torchrun process's rows (equal shares), concatenated in rank order, with their gradient
    (GatherWithGradient); alone, the rows as they are."""
    return rows if distributed_world_size() == 1 else GatherWithGradient.apply(rows)

# -----------------------------------------------------------------------------
# the feature database: written by train.py after every epoch, read by test.py and `report.py map`

# Each split the database holds (test: the gallery; In-shop's query; train, at the final epoch)
# is stored as {split}_images (paths), {split}_labels (indices into test_classes, or
# train_classes for train) and {split}_embeddings [N, D]; besides them: test_classes,
# train_classes, the proxies, the epoch and the run's arguments.
DATABASE_SPLIT_FIELDS = ('images', 'labels', 'embeddings')
DATABASE_KEYS = ('test_embeddings', 'test_labels', 'test_classes', 'test_images')  # what every database has


@dataclass
class RetrievalData:
    """A data set's splits as flat lists. images[split] are paths and labels[split] class indices,
    for 'train' into train_classes, for 'test' (the gallery) and 'query' (In-shop's queries, which
    search the gallery; empty elsewhere) into test_classes."""
    images: dict
    labels: dict
    train_classes: list
    test_classes: list

    @classmethod
    def from_splits(cls, splits):
        """From load_splits' {split: {class name: [paths]}}; labels index the sorted class names."""
        train_classes = sorted(splits['train'])
        gallery = splits.get('gallery', splits.get('test'))
        test_classes = sorted(set(gallery) | set(splits.get('query', {})))
        flat = {'train': flatten_split(splits['train'], train_classes), 'test': flatten_split(gallery, test_classes),
                'query': flatten_split(splits.get('query', {}), test_classes)}
        return cls({split: paths for split, (paths, _) in flat.items()},
                   {split: labels for split, (_, labels) in flat.items()}, train_classes, test_classes)

    def split(self, name):
        return self.images[name], self.labels[name]


def build_database(data, embeddings, proxies, epoch, args):
    """The database of one epoch: the class names, the proxies, and for each split embedded this
    epoch ({split: [N, D] embeddings}) its images, labels and embeddings; args: the run's (a dict)."""
    database = {'test_classes': data.test_classes, 'train_classes': data.train_classes,
                'proxies': proxies.detach().cpu(), 'epoch': epoch, 'args': args}
    for split, split_embeddings in embeddings.items():
        values = (data.images[split], data.labels[split], split_embeddings.detach().cpu())
        database.update({f'{split}_{field}': value for field, value in zip(DATABASE_SPLIT_FIELDS, values)})
    return database


def load_database(path):
    """The feature database train.py wrote to `path`, checked to hold at least the test split."""
    return load_torch_file(path, 'database', DATABASE_KEYS, not_found=(
        f'{path} does not exist; train.py writes the database to its --output_dir'))


def database_split(database, split):
    """(image paths, labels, embeddings) of one split of a database; empty lists when it has none."""
    return tuple(database.get(f'{split}_{field}', []) for field in DATABASE_SPLIT_FIELDS)

# -----------------------------------------------------------------------------
# evaluation: retrieval metrics

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

    Similarities come in tiles with a running top-k per query, so the memory beyond the
    embeddings and the result is about block_bytes, whatever N. Tiles are square, except that
    a few queries against another gallery take wide ones: fewer, larger matrix products.
    """
    square = max(k + 1, int((block_bytes / 32) ** 0.5))  # a float32 tile and topk's working memory
    query_tile = square if same_set else min(square, max(1, len(queries)))
    gallery_tile = square if same_set else max(k + 1, int(block_bytes / 32 / query_tile))
    best = torch.full((len(queries), k), torch.iinfo(torch.int64).min, dtype=torch.int64, device=queries.device)

    def merge(first, keys):
        rows = slice(first, first + len(keys))
        best[rows] = torch.cat([best[rows], keys], dim=1).topk(k, dim=1).values

    for q in range(0, len(queries), query_tile):
        # a query set against itself is symmetric: tile (q, g) also serves as (g, q), a third less work
        for g in range(q if same_set else 0, len(gallery), gallery_tile):
            similarities = queries[q:q + query_tile] @ gallery[g:g + gallery_tile].t()
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


def retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks, metrics, same_set, block_bytes,
                      on_neighbours=None):
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
    if on_neighbours is not None:
        on_neighbours(neighbours)
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
             block_bytes=1 << 28, on_neighbours=None):
    """Retrieval metrics of L2-normalised embeddings (cosine similarity), as fractions in [0, 1].

    Every embedding queries the others, or, given a gallery, the gallery (query->gallery
    protocols such as In-shop). Keys, for the metrics asked for: recall@K for each K (a
    same-class item among the K nearest), r_precision and map@r (Musgrave et al., ECCV 2020),
    and nmi (k-means with one cluster per class, seed 0, against the labels; on the queries).
    Neighbours are exact: highest similarity first, ties to the lower gallery index. Memory
    is bounded by block_bytes (plus the embeddings), never N x N. on_neighbours, if given, is
    called with the [queries, k] gallery indices of the nearest neighbours (for benchmarks).
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
                                         block_bytes, on_neighbours))
    if 'nmi' in metrics:
        num_classes = len(torch.unique(labels))
        results['nmi'] = nmi(labels, kmeans(embeddings, num_classes, block_bytes=block_bytes))
    return results


def recall(embeddings, labels, ks):
    """Recall@K for each K in ks, as a list of fractions."""
    results = evaluate(embeddings, labels, ks, metrics=('recall',))
    return [results[f'recall@{k}'] for k in ks]


def mean_pairwise_cosine(vectors):
    """The mean cosine over every pair of distinct rows, exactly, without the N x N matrix: with
    the rows normalised, the sum of all pairs' cosines is |sum of rows|^2 minus the N self-pairs."""
    unit = torch.nn.functional.normalize(vectors.detach().double(), dim=1)
    n, total = len(unit), unit.sum(dim=0)
    return ((total @ total - n) / (n * (n - 1))).item() if n > 1 else math.nan


def max_pairwise_cosine(vectors, block=1024):
    """The largest cosine between two distinct rows (the closest pair), in blocks of rows."""
    unit = torch.nn.functional.normalize(vectors.detach().float(), dim=1)
    largest = -math.inf
    for start in range(0, len(unit), block):
        cosines = unit[start:start + block] @ unit.t()
        rows = torch.arange(len(cosines), device=unit.device)
        cosines[rows, rows + start] = -math.inf  # not a pair
        largest = max(largest, cosines.max().item())
    return largest if len(unit) > 1 else math.nan


def collapse_diagnostics(proxies, embeddings):
    """Whether a run's proxies or embeddings fell into one cone, per epoch: the proxies' mean and
    largest pairwise cosine and the length of their mean direction (of unit proxies: 0 when they
    are spread evenly, 1 when they all coincide), the test embeddings' mean pairwise cosine."""
    mean_length = torch.nn.functional.normalize(proxies.detach().double(), dim=1).mean(dim=0).norm().item()
    return {'proxy_cosine_mean': mean_pairwise_cosine(proxies), 'proxy_cosine_max': max_pairwise_cosine(proxies),
            'proxy_mean_length': mean_length,
            'embedding_cosine_mean': mean_pairwise_cosine(embeddings)}

# -----------------------------------------------------------------------------
# figures of runs: drawn by train.py after every run, and by report.py from a run's files


def pyplot():
    """matplotlib's pyplot, drawing to files, with SciencePlots' styles registered: imported on first use."""
    import matplotlib
    matplotlib.use('Agg')  # figures go to files; no display needed
    import matplotlib.pyplot as plt
    import scienceplots  # noqa: F401  (registers the 'science' matplotlib styles)
    return plt


RUN_COLUMNS = ('epoch', 'loss', 'accuracy')  # with DIAGNOSTICS, every other column of a statistics CSV is a test metric
# collapse_diagnostics, and the share of proxies that a gradient reached in the epoch: (label, axis range)
DIAGNOSTICS = {'proxy_cosine_mean': ('proxy cos, mean', (-0.1, 1.02)),
               'proxy_cosine_max': ('proxy cos, max', (-0.1, 1.02)),
               'proxy_mean_length': ('|mean proxy|', (0, 1.02)),
               'embedding_cosine_mean': ('test emb. cos, mean', (-0.1, 1.02)),
               'proxies_updated': ('proxies reached', (0, 1.02))}
RUN_FILE_SUFFIXES = ('_statistics.csv', '_results.png', '_data_base.pth')
METRIC_LABELS = {'r_precision': 'R-Precision', 'map@r': 'MAP@R', 'nmi': 'NMI'}
GOLDEN_RATIO_FRACTION = 0.618034
SEED_TAIL = re.compile(r'_seed\d+$')  # run names end in _seed{N}: the rest is the same for every seed


def run_prefix(path):
    """A run file's path without its suffix: results/{run}_statistics.csv -> results/{run}."""
    for suffix in RUN_FILE_SUFFIXES:
        if path.endswith(suffix):
            return path.removesuffix(suffix)
    return os.path.splitext(path)[0]


def run_label(path):
    return os.path.basename(run_prefix(path))


def metric_label(column):
    return METRIC_LABELS.get(column, column.replace('recall', 'R'))


def metric_columns(tables):
    """The test-metric columns of statistics tables, in order of first appearance."""
    return list(dict.fromkeys(c for table in tables for c in table.columns
                              if c not in RUN_COLUMNS and c not in DIAGNOSTICS))


def diagnostic_columns(tables):
    """The collapse-diagnostics columns that statistics tables hold, in DIAGNOSTICS' order."""
    present = {c for table in tables for c in table.columns}
    return [c for c in DIAGNOSTICS if c in present]


def save_figure(fig, path):
    """Write a figure to `path` (PNG) and beside it as PDF, each atomically, and close it."""
    plt = pyplot()
    for out in (path, os.path.splitext(path)[0] + '.pdf'):
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=200)
    plt.close(fig)


def seed_group(label):
    """What a run shares with the runs that differ from it only in --seed: its name without _seed{N}."""
    return SEED_TAIL.sub('', label)


def group_runs(runs):
    """{group: {label: table}} of runs ({label: table}), groups in order of their first run."""
    groups = {}
    for label, table in runs.items():
        groups.setdefault(seed_group(label), {})[label] = table
    return groups


def seed_curves(runs):
    """{label: (mean table, std table or None)}: one entry per seed group, its curves averaged per
    epoch over its runs (a group of one run is that run, without spread)."""
    import pandas as pd
    curves = {}
    for group, members in group_runs(runs).items():
        if len(members) == 1:
            [(label, table)] = members.items()
            curves[label] = (table, None)
            continue
        per_epoch = pd.concat(members.values()).groupby('epoch', sort=True)
        curves[f'{group} (mean ± std, n={len(members)} seeds)'] = (per_epoch.mean().reset_index(),
                                                             per_epoch.std().reset_index())
    return curves


def plot_runs(runs, path, mean_over_seeds=False):
    """Training loss, proxy accuracy and every test metric per epoch, a panel each, one line per run
    ({label: statistics table}) in every panel, or with mean_over_seeds one per seed group, its mean
    with a band of ± one standard deviation; writes `path` (PNG) and its PDF, returns the figure."""
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    curves = seed_curves(runs) if mean_over_seeds else {label: (table, None) for label, table in runs.items()}
    panels = [('loss', 'training loss', 1), ('accuracy', 'proxy accuracy (%)', 100)]
    panels += [(column, f'{metric_label(column)} (%)', 100) for column in metric_columns(runs.values())]
    panels += [(column, DIAGNOSTICS[column][0], 1) for column in diagnostic_columns(runs.values())]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    with plt.style.context(['science', 'no-latex']):
        # a run keeps its colour and line style in every panel, even where it lacks a metric
        styles = list(plt.rcParams['axes.prop_cycle'])
        fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 1.8 * rows + 0.2 * len(curves)),
                                 squeeze=False, sharex=True, layout='constrained')
        for i, (ax, (column, ylabel, scale)) in enumerate(zip(axes.flat, panels)):
            for j, (label, (table, spread)) in enumerate(curves.items()):
                if column not in table:
                    continue
                style = styles[j % len(styles)]
                # the epochs that have the value: a line joins the evaluated epochs across those that
                # --eval_every skipped (NaN), where matplotlib would break it
                has = table[column].notna()
                epochs, values = table['epoch'][has], table[column][has]
                ax.plot(epochs, scale * values, marker='.', label=label, **style)
                if spread is not None:
                    ax.fill_between(epochs, scale * (values - spread[column][has]), scale * (values + spread[column][has]),
                                    color=style['color'], alpha=0.2, linewidth=0)
            ax.set(xlabel='epoch' if i + columns >= len(panels) else '', ylabel=ylabel)
            if column in DIAGNOSTICS:  # one scale for every run, so that a collapse reads at a glance
                ax.set_ylim(*DIAGNOSTICS[column][1])
            elif scale == 100:  # a share: the autoscaled margin must not show impossible values above 100 %
                low, high = ax.get_ylim()
                ax.set_ylim(max(low, 0), min(high, 100))
                for line in ax.get_lines():  # a point at 100 % shows whole on the panel's top edge
                    line.set_clip_on(False)
            # shared epochs (loss and accuracy start at 1), in whole numbers, labelled under every panel
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelbottom=True)
        # from the first epoch (0: the untrained network) to the last, with room for the end markers
        first, last = min(table['epoch'].min() for table, _ in curves.values()), max(
            table['epoch'].max() for table, _ in curves.values())
        axes.flat[0].set_xlim(first - 0.02 * max(last - first, 1), last + 0.02 * max(last - first, 1))
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        # every run has a loss column, so the first panel holds one line per run
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc='outside upper center', frameon=False)
    save_figure(fig, path)
    return fig


def plot_statistics(statistics, path):
    """One run's figure (train.py, every epoch), labelled with the run name taken from `path`."""
    return plot_runs({run_label(path): statistics}, path)


def embedding_coordinates(embeddings, labels, max_points=2000, seed=0):
    """2-D t-SNE coordinates of at most max_points embeddings (a random subset beyond that), and their
    labels. Deterministic: the subset, t-SNE's random state and its PCA initialisation follow `seed`."""
    # only the map needs scikit-learn (and its threadpoolctl), whose import takes a second
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    embeddings = torch.as_tensor(embeddings).detach().cpu().float()
    check_embeddings(embeddings, 'embeddings')
    labels = as_label_tensor(labels, 'labels', len(embeddings), 'cpu').numpy()
    keep = np.sort(np.random.default_rng(seed).permutation(len(embeddings))[:max_points])
    points = embeddings.numpy()[keep]
    if np.ptp(points, axis=0).max() < 1e-6:
        # all alike (a collapsed network): t-SNE's PCA start would divide by a zero spread, and its
        # Barnes-Hut step then crashes the process; one spot is the honest map of one point
        return np.zeros((len(keep), 2), np.float32), labels[keep]
    # the perplexity (roughly the neighbours each point keeps close) must stay below the number of points
    tsne = TSNE(perplexity=min(30.0, len(keep) - 1), init='pca', random_state=seed)
    # one thread: t-SNE's threads meet at a barrier in each of its 1,000 iterations, and with another
    # process on the cores they spin there (here 1,000 points took 3 s on one thread, 30 s on two)
    with threadpool_limits(1):
        return tsne.fit_transform(points), labels[keep]


def lch_colours(n, chroma=45.0, lightnesses=(58.0, 78.0, 40.0)):
    """n RGBA colours spaced by eye: hues in golden-ratio steps round the CIELCh circle (perceptual, unlike
    HSV's), lightness cycling through three levels, so that classes next in order differ in both."""
    i = np.arange(n)
    hue = 2 * np.pi * (i * GOLDEN_RATIO_FRACTION % 1)
    lightness = np.asarray(lightnesses)[i % len(lightnesses)]
    # CIELAB (D65 white) -> XYZ -> linear sRGB -> sRGB; colours outside sRGB are clipped into it
    fy = (lightness + 16) / 116
    f = np.stack([fy + chroma * np.cos(hue) / 500, fy, fy - chroma * np.sin(hue) / 200], axis=1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * [0.95047, 1.0, 1.08883]
    to_linear_rgb = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    linear = np.clip(xyz @ to_linear_rgb.T, 0, 1)
    rgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.column_stack([rgb, np.ones(n)])


def class_colours(n):
    """n RGBA colours, one per class, as far apart as n allows: tab10 up to 10 classes; tab20 up to 20,
    its dark shades first, so that no two of the first ten share a hue; beyond 20, lch_colours."""
    plt = pyplot()
    if n <= 10:
        return plt.cm.tab10(np.arange(n))
    if n <= 20:
        return plt.cm.tab20(np.r_[0:20:2, 1:20:2][:n])
    return lch_colours(n)


def plot_embedding_map(embeddings, labels, class_names, path, max_points=2000, seed=0):
    """t-SNE map of embeddings coloured by class (labels index class_names, colours class_colours);
    writes `path` (PNG) and its PDF, returns the figure. Up to 20 classes a legend names them; beyond,
    no palette tells every class apart, and there is no legend."""
    from matplotlib.lines import Line2D
    plt = pyplot()
    coordinates, labels = embedding_coordinates(embeddings, labels, max_points, seed)
    classes, index = np.unique(labels, return_inverse=True)
    few = len(classes) <= 20
    palette = class_colours(len(classes))
    colours = palette[index]
    subset = f' of {len(embeddings)}' if len(labels) < len(embeddings) else ''
    with plt.style.context(['science', 'no-latex']):
        fig, ax = plt.subplots(figsize=(5, 4.2) if few else (4.2, 4.2), layout='constrained')
        ax.scatter(coordinates[:, 0], coordinates[:, 1], s=4, c=colours, linewidths=0)
        ax.set(xticks=[], yticks=[], title=f't-SNE of {len(labels)}{subset} embeddings, {len(classes)} classes')
        if few:
            handles = [Line2D([], [], ls='', marker='o', markersize=3, color=palette[i], label=class_names[c])
                       for i, c in enumerate(classes)]
            fig.legend(handles=handles, loc='outside right upper', fontsize=5, frameon=False)
    save_figure(fig, path)
    return fig

# -----------------------------------------------------------------------------
# the old command line: utils.py ran reports and the export; they have scripts of their own

MOVED_COMMANDS = {verb: ['report.py', verb] for verb in ('plot', 'table', 'map', 'structure')} | {'export': ['export.py']}


def moved(argv):
    """The one line that answers `python utils.py` + argv: where its command went, with its arguments."""
    if argv and argv[0] in MOVED_COMMANDS:
        return f'utils.py {argv[0]} has moved: python {shlex.join(MOVED_COMMANDS[argv[0]] + argv[1:])}'
    return ('utils.py runs no command: its plot, table, map and structure moved to python report.py, '
            'its export to python export.py')


if __name__ == '__main__':
    sys.exit(moved(sys.argv[1:]))  # the line goes to stderr, and the exit status is 1
