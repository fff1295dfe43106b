"""Proxy losses. The proxies (one learnable vector per training class) live in the loss.

With f the L2-normalised embeddings, p the L2-normalised proxies, S = f p^T and
L = mean cross-entropy(scale * S, y):

- normalized_softmax: plain L, gradients as autograd gives them.
- positive_proxy ("learning with only positive embeddings"): same value and same proxy
  gradient as normalized softmax, but each embedding is pulled only by its own class
  proxy: dL/df_i = (dL/dS)[i, y_i] * p_{y_i}. Negative proxies never push embeddings;
  they only move the proxies apart.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import choose


def at_least_fp32(x):
    # mixed-precision embeddings are upcast: scale * cosine sharpens the softmax enough that
    # fp16/bf16 rounding of the logits visibly changes the loss
    return x.to(torch.promote_types(x.dtype, torch.float32))


class NormalizedSoftmaxLoss(nn.Module):

    def __init__(self, num_classes, feature_dim, scale=32.0):
        super().__init__()
        self.scale = scale
        self.proxies = nn.Parameter(torch.randn(num_classes, feature_dim) / feature_dim ** 0.5)

    def similarities(self, embeddings, proxies, labels):
        return embeddings @ proxies.t()

    def forward(self, embeddings, labels):
        embeddings = F.normalize(at_least_fp32(embeddings), dim=-1)
        proxies = F.normalize(at_least_fp32(self.proxies), dim=-1)
        return F.cross_entropy(self.scale * self.similarities(embeddings, proxies, labels), labels)

    @torch.no_grad()
    def predict(self, embeddings):
        """Class of the nearest proxy (for the proxy-classification accuracy)."""
        return (at_least_fp32(embeddings) @ F.normalize(at_least_fp32(self.proxies), dim=-1).t()).argmax(dim=-1)


class PositiveProxyLoss(NormalizedSoftmaxLoss):

    def similarities(self, embeddings, proxies, labels):
        # Proxies see the full similarity matrix; embeddings see none of it (detached)...
        all_pairs = embeddings.detach() @ proxies.t()
        # ...except their own proxy, through a term whose value is zero (straight-through)
        # and whose gradient w.r.t. f_i is p_{y_i}, scaled by dL/dS[i, y_i].
        positive = (embeddings * proxies[labels].detach()).sum(dim=-1)
        positive_only = F.one_hot(labels, proxies.shape[0]).to(embeddings.dtype) * (positive - positive.detach())[:, None]
        return all_pairs + positive_only


LOSSES = {'normalized_softmax': NormalizedSoftmaxLoss, 'positive_proxy': PositiveProxyLoss}


def build_loss(loss_name, num_classes, feature_dim, scale=32.0):
    return choose(LOSSES, loss_name, '--loss_name')(num_classes, feature_dim, scale)
