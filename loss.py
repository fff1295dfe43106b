"""Proxy losses. The proxies (one learnable vector per training class) live in the loss.

With f the L2-normalised embeddings, p the L2-normalised proxies and S = f p^T, every loss is a
function of S, and G = dL/dS is what its backward sends towards both sides:
dL/df = G p for the embeddings and dL/dp = G^T f for the proxies. The losses differ in L, and in
which part of G each side gets (`GRADIENT_RULES`):

| loss                   | L                  | embeddings get   | proxies get                       |
|------------------------|--------------------|------------------|-----------------------------------|
| normalized_softmax     | normalized softmax | all of G         | all of G                          |
| positive_proxy         | normalized softmax | all of G         | positive pairs, mean over class   |
| positive_pull          | normalized softmax | positive pairs   | all of G                          |
| proxy_anchor           | Proxy-Anchor       | all of G         | all of G                          |
| positive_proxy_anchor  | Proxy-Anchor       | all of G         | positive pairs, mean over class   |

positive_proxy is the method ("learning proxies with only positive embeddings"): proxy j learns
only from the batch's embeddings of class j, dL/dp_j = (1/n_j) sum_{i: y_i = j} G_ij f_i, and
negatives never move it. positive_pull, the opposite side, is kept as an ablation.

Under torchrun every process computes the loss of the global batch (global_batch), so each loss
gives the network and the proxies the gradient one process gets on the whole batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import choose, gather_rows


def at_least_fp32(x):
    # mixed-precision embeddings are upcast: scale * cosine sharpens the softmax enough that
    # fp16/bf16 rounding of the logits visibly changes the loss
    return x.to(torch.promote_types(x.dtype, torch.float32))


def global_batch(embeddings, labels):
    """The embeddings and labels of every torchrun process's share of the batch (the shares are equal:
    train.py splits --batch_size evenly), the embeddings with their gradient; alone, the batch as it is.
    So every rank computes the loss of the global batch, and its log-sum-exps and class counts are
    those of one process on the whole batch."""
    return gather_rows(embeddings), gather_rows(labels)  # the labels have no gradient to send back


def positive_pairs(labels, num_classes, dtype):
    """1 on the pairs (i, y_i), 0 elsewhere. (A comparison, not F.one_hot, which reads the labels'
    range back to the host.)"""
    return (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(dtype)


def class_counts(labels, num_classes):
    """n_j, the embeddings of each class in the batch (not by bincount, which reads the labels' largest
    value back to the host, so waits for the device)."""
    counts = torch.zeros(num_classes, dtype=labels.dtype, device=labels.device)
    return counts.index_add_(0, labels, torch.ones_like(labels))


def positive_class_mean(labels, num_classes, dtype):
    """1/n_j on the pairs (i, y_i), 0 elsewhere: the positive terms, averaged over each class's embeddings.
    A class absent from the batch gets no term, so its proxy a zero gradient."""
    return positive_pairs(labels, num_classes, dtype) / class_counts(labels, num_classes).clamp(min=1).to(dtype)


# what each side of S = f p^T gets of dL/dS: a mask (from the labels) that the arriving gradient is
# multiplied by, or None for all of it
GRADIENT_MASKS = {'all': None, 'positive': positive_pairs, 'positive_class_mean': positive_class_mean}


class MaskedSimilarity(torch.autograd.Function):
    """S = f p^T, whose backward multiplies the gradient that arrives by a mask per side. Masking what
    arrives, rather than recomputing it from the loss, keeps it right under whatever scales it:
    the mean over the batch, fp16 loss scaling, a loss multiplied by a weight."""

    @staticmethod
    def forward(ctx, embeddings, proxies, embedding_mask, proxy_mask):
        ctx.save_for_backward(embeddings, proxies, embedding_mask, proxy_mask)
        return embeddings @ proxies.t()

    @staticmethod
    def backward(ctx, grad):
        embeddings, proxies, embedding_mask, proxy_mask = ctx.saved_tensors
        grad_embeddings = grad_proxies = None
        if ctx.needs_input_grad[0]:
            grad_embeddings = (grad if embedding_mask is None else grad * embedding_mask) @ proxies
        if ctx.needs_input_grad[1]:
            grad_proxies = (grad if proxy_mask is None else grad * proxy_mask).t() @ embeddings
        return grad_embeddings, grad_proxies, None, None


def similarities(embeddings, proxies, labels, rule=('all', 'all')):
    """S = f p^T, with the gradient rule (embeddings' part, proxies' part) of GRADIENT_MASKS: the one
    owner of the positive-only rules."""
    if rule == ('all', 'all'):  # plain autograd
        return embeddings @ proxies.t()
    masks = [GRADIENT_MASKS[side] and GRADIENT_MASKS[side](labels, proxies.shape[0], embeddings.dtype) for side in rule]
    return MaskedSimilarity.apply(embeddings, proxies, *masks)


class ProxyLoss(nn.Module):
    """The proxies, the normalisations and the gradient rule; a subclass defines L as a function of S."""

    def __init__(self, num_classes, feature_dim, scale=32.0, rule=('all', 'all')):
        super().__init__()
        self.scale, self.rule = scale, tuple(rule)
        self.proxies = nn.Parameter(self.initial_proxies(num_classes, feature_dim))

    @staticmethod
    def initial_proxies(num_classes, feature_dim):
        return torch.randn(num_classes, feature_dim) / feature_dim ** 0.5

    def forward(self, embeddings, labels):
        """L of the batch; under torchrun, of the global batch, on every rank."""
        embeddings, labels = global_batch(at_least_fp32(embeddings), labels)  # gathered in fp32: exact sums
        embeddings = F.normalize(embeddings, dim=-1)
        proxies = F.normalize(at_least_fp32(self.proxies), dim=-1)
        return self.loss(similarities(embeddings, proxies, labels, self.rule), labels)

    def loss(self, cosines, labels):
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, embeddings):
        """Class of the nearest proxy (for the proxy-classification accuracy)."""
        return (at_least_fp32(embeddings) @ F.normalize(at_least_fp32(self.proxies), dim=-1).t()).argmax(dim=-1)


class NormalizedSoftmaxLoss(ProxyLoss):
    """Cross-entropy of softmax(scale * S), averaged over the batch (Zhai & Wu, 2019)."""

    def loss(self, cosines, labels):
        return F.cross_entropy(self.scale * cosines, labels)


class ProxyAnchorLoss(ProxyLoss):
    """Proxy-Anchor (Kim et al., CVPR 2020), scale = alpha:
    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} e^{-alpha (s(x,p) - margin)})
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} e^{alpha (s(x,p) + margin)}),
    P+ the proxies with a positive in the batch, X_p+ / X_p- the embeddings of p's class / of the others."""

    def __init__(self, num_classes, feature_dim, scale=32.0, rule=('all', 'all'), margin=0.1):
        super().__init__(num_classes, feature_dim, scale, rule)
        self.margin = margin

    @staticmethod
    def initial_proxies(num_classes, feature_dim):
        # the official code's initialisation: Kaiming normal, fan_out
        return nn.init.kaiming_normal_(torch.empty(num_classes, feature_dim), mode='fan_out')

    def loss(self, cosines, labels):
        positive = positive_pairs(labels, cosines.shape[1], torch.bool)
        # log(1 + sum e^z) = logsumexp over the terms and a zero; masked-out terms are -inf
        zero = cosines.new_zeros(1, cosines.shape[1])
        pull = torch.where(positive, -self.scale * (cosines - self.margin), -torch.inf)
        push = torch.where(positive, -torch.inf, self.scale * (cosines + self.margin))
        # a proxy without positives has log(1 + 0) = 0 there, so the sum over all proxies is the one
        # over P+ (without a boolean index, which reads its count back to the host)
        pull_term = torch.logsumexp(torch.cat([pull, zero]), dim=0).sum() / positive.any(dim=0).sum()
        push_term = torch.logsumexp(torch.cat([push, zero]), dim=0).sum() / cosines.shape[1]
        return pull_term + push_term


# name: (L, the gradient rule as (embeddings' part, proxies' part) of GRADIENT_MASKS)
GRADIENT_RULES = {
    'positive_proxy': (NormalizedSoftmaxLoss, ('all', 'positive_class_mean')),
    'normalized_softmax': (NormalizedSoftmaxLoss, ('all', 'all')),
    'positive_pull': (NormalizedSoftmaxLoss, ('positive', 'all')),
    'proxy_anchor': (ProxyAnchorLoss, ('all', 'all')),
    'positive_proxy_anchor': (ProxyAnchorLoss, ('all', 'positive_class_mean')),
}
LOSSES = tuple(GRADIENT_RULES)

# train.py defaults that differ per loss (on top of the backbone family's recipe); where from:
# Proxy-Anchor's official repository trains one warm-up epoch (--warm 1) in which only the new
# embedding layer and the proxies learn. positive_proxy centres the embeddings: every class's mean
# embedding shares one common direction, strongest from scratch but there from ImageNet weights
# too, and proxies that follow only their own class's embeddings all turn towards it
# (docs/results.md#proxy-collapse-from-scratch); centring costs Proxy-Anchor's two, which keep none
RECIPES = {'proxy_anchor': {'warmup_epochs': 1}, 'positive_proxy_anchor': {'warmup_epochs': 1},
           'positive_proxy': {'embedding_norm': 'batchnorm'}}


def loss_recipe(loss_name):
    """The train.py defaults that loss_name sets (empty for most losses)."""
    return RECIPES.get(loss_name, {})


def build_loss(loss_name, num_classes, feature_dim, scale=32.0):
    """The loss `loss_name` (holding the proxies); scale is the softmax's, or Proxy-Anchor's alpha."""
    loss_class, rule = choose(GRADIENT_RULES, loss_name, '--loss_name')
    return loss_class(num_classes, feature_dim, scale, rule)
