"""Split batch norm: synthetic cells normalised by batch-norm layers of their own (`synthetic_bn=split`).

A classifier trained on real and synthetic cells normalises both with one set of batch-norm statistics, which
the test split (real cells only) then meets. AdvProp (Xie et al., CVPR 2020) gives the other distribution its own
auxiliary batch norm: every BatchNorm layer becomes a `SplitBatchNorm` whose `main` layer (the original module,
its statistics and affine weights) normalises the real rows of a batch and whose `aux` copy normalises the
synthetic rows; the convolutions and the head are shared. Scoring (val, test) uses `main` alone, so the kept
weights see real-cell statistics only.

    n = split_batchnorm(model)           # every BatchNorm layer, in place; its number
    with synthetic_rows(model, mask):    # mask: bool [B], True where the row is synthetic
        logits = model(x)                # one forward pass: each layer splits the batch by the mask

`real_layers(state_dict)` is a split model's weights as the plain architecture holds them (each `main` layer under
its original name, the `aux` ones dropped): what scoring uses, and what a run's kept weights are outside the run
(hpcgan.classify.kept: the logit-shift control, tools/export_weights.py).

One forward pass per step (DDP's reducer sees one), the rows' order unchanged. A batch without synthetic rows
runs `main` alone; `aux` then gets no gradient (under DDP: find_unused_parameters).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm(nn.Module):
    """`main` (the original BatchNorm) for the real rows, `aux` (a copy made at the split) for the synthetic ones."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.main, self.aux = bn, copy.deepcopy(bn)
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None   # (real, synthetic) row indices of this pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.main(x)
        real, synthetic = self.rows
        if not len(synthetic):
            return self.main(x)
        if not len(real):
            return _normalise(self.aux, x)
        out = torch.empty_like(x)   # advanced indexing keeps x's memory format (index_select would not)
        out[real] = _normalise(self.main, x[real])
        out[synthetic] = _normalise(self.aux, x[synthetic])
        return out


def _normalise(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """`bn` on `x`; a part with one value per channel (one row of a 1x1 map: no batch statistics) is normalised
    by the layer's running statistics, which it leaves as they are."""
    if not bn.training or x.numel() > x.shape[1] or bn.running_mean is None:
        return bn(x)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def split_batchnorm(model: nn.Module) -> int:
    """Replace every batch-norm layer of `model` (in place) by a SplitBatchNorm around it; how many. ValueError
    when it has none (nothing to split: the option would change nothing)."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, SplitBatchNorm(child))
                n += 1
    if not n:
        raise ValueError("synthetic_bn=split: this architecture has no batch-norm layer to split; use "
                         "synthetic_bn=shared or an architecture with batch norm")
    return n


@contextmanager
def synthetic_rows(model: nn.Module, rows: torch.Tensor | None, device: torch.device | str | None = None):
    """Within it, every SplitBatchNorm of `model` sends the rows where `rows` (bool [B]) is True to its `aux` layer.
    The rows' indices are found once here, on the host, and moved to `device` (default: rows'): no layer waits on
    the accelerator for them. `rows` None (a run without split layers, on each of its steps): nothing to do."""
    if rows is None:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, SplitBatchNorm)]
    flags = rows.cpu()
    split = tuple(torch.nonzero(f).flatten().to(device or rows.device) for f in (~flags, flags))
    for m in layers:
        m.rows = split
    try:
        yield
    finally:
        for m in layers:
            m.rows = None


def real_layers(state: dict) -> dict:
    """A split model's state dict as the plain architecture's: each SplitBatchNorm's `main` tensors under the
    layer's own name, its `aux` tensors dropped. A state dict without split layers comes back as it is."""
    split = ({k.rsplit(".aux.", 1)[0] for k in state if ".aux." in k} &
             {k.rsplit(".main.", 1)[0] for k in state if ".main." in k})   # a layer holds both
    out = {}
    for k, v in state.items():
        layer = next((p for p in split if k.startswith(f"{p}.main.") or k.startswith(f"{p}.aux.")), None)
        if layer is None:
            out[k] = v
        elif k.startswith(f"{layer}.main."):
            out[f"{layer}.{k[len(layer) + 6:]}"] = v
    return out
