"""The learning-rate schedule, the guard that skips non-finite updates, and Muon.

Each stage's loop does its own backward, clipping and optimizer step; the schedule and
the guard are the bookkeeping around them that every stage shares. Muon is pretraining's
optimizer for the transformer's hidden matrices (AdamW keeps the rest).
"""

import math
import os

import torch
from torch import Tensor

from cli import UserError
from distributed import print0


def lr_at(step, max_lr, warmup, total, min_lr_ratio=0.1):
    """Linear warmup to max_lr, then cosine decay to min_lr_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class NonFiniteGuard:
    """Says whether an update may be applied: not when the loss or the gradient norm is
    non-finite (the loop then drops the gradients and leaves the weights and optimizer
    state as they were; under DDP every rank sees the same all-reduced figures, so all
    of them skip together). After `limit` skipped updates in a row the run stops with a
    clear error, before anything else is written, so the last checkpoint on disk is the
    last good one. `model` names which model's update it is when one loop steps two (PPO's
    policy and value model): each has its own run of skips, so the other's good updates do
    not hide it."""

    def __init__(self, limit=10, ckpt_path=""):
        self.limit, self.ckpt_path, self.skipped, self.in_a_row = limit, ckpt_path, 0, {}

    def ok(self, grad_norm, step, loss=0.0, model=""):
        """True if the update may be applied; counts and reports the ones that may not."""
        if math.isfinite(grad_norm) and math.isfinite(loss):
            self.in_a_row[model] = 0
            return True
        self.skipped += 1
        self.in_a_row[model] = self.in_a_row.get(model, 0) + 1
        of = f" of the {model}" if model else ""
        print0(f"warning: step {step}: non-finite loss or gradient{of}, update skipped "
               f"({self.skipped} so far)")
        if self.in_a_row[model] >= self.limit:
            kept = (f"{self.ckpt_path} holds the last good weights; "
                    if os.path.exists(self.ckpt_path) else "")
            raise UserError(f"{self.limit} non-finite updates in a row, at step {step}: "
                            f"stopping; {kept}try a lower --learning_rate or --grad_clip")
        return False

    def logged(self):
        """What goes into the step's log: the count of skipped updates, once there are any."""
        return {"skipped": self.skipped} if self.skipped else {}

    def state_dict(self):
        """The counts a checkpoint keeps, so that a resumed run counts on from them."""
        return {"skipped": self.skipped, "in_a_row": dict(self.in_a_row)}

    def load_state_dict(self, state):
        self.skipped, self.in_a_row = int(state["skipped"]), dict(state["in_a_row"])


# --- Muon --------------------------------------------------------------------------------
# Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks" (blog post):
# take SGD's momentum for a weight matrix, replace it by the nearest semi-orthogonal matrix
# (all its singular values set to 1), and step along that. Every direction of the update
# moves by the same amount, where Adam's elementwise steps follow the few directions that
# dominate the gradient. Liu et al. 2025, "Muon is Scalable for LLM Training": scaled by
# 0.2·sqrt(max(rows, cols)), the update's root-mean-square is 0.2, about AdamW's, so the two
# share one learning rate and one weight decay. Embeddings, the output head (tied to them
# here) and LayerNorm gains stay with AdamW, as both papers do.

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # quintic coefficients (Jordan et al. 2024)


def orthogonalise(g: Tensor, steps: int = 5) -> Tensor:
    """About U·Vᵀ for g = U·S·Vᵀ: g's singular vectors, its singular values moved from
    (0, 1] (after dividing by the Frobenius norm) to roughly 0.7-1.2 by `steps` rounds of
    x ← a·x + (b·A + c·A²)·x with A = x·xᵀ, an odd polynomial of x. The coefficients
    trade exactness for speed: five rounds instead of the many that would converge to 1."""
    a, b, c = NEWTON_SCHULZ
    x = g.float() / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:  # work on the wide side: A is the smaller square
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups that say muon=True (2-D weight matrices), AdamW for
    the others; one learning rate and weight decay for both (set per group, as AdamW's).

    Muon's step on a matrix W with gradient G, momentum μ (Nesterov's form):
        M ← μ·M + G;   U = orthogonalise(G + μ·M)
        W ← W·(1 − lr·wd) − lr · 0.2·sqrt(max(rows, cols)) · U
    The AdamW step is torch.optim.AdamW's (decoupled decay, bias-corrected moments)."""

    def __init__(self, groups, lr: float, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps,
                                      weight_decay=weight_decay, muon=False))
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon's muon=True groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["muon"]:
                    if not state:
                        state["momentum"] = torch.zeros_like(p)
                    m, mu = state["momentum"], group["momentum"]
                    m.mul_(mu).add_(p.grad)
                    update = orthogonalise(p.grad.add(m, alpha=mu))
                    p.mul_(1 - lr * decay).add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
                    continue
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                (b1, b2), m, v = group["betas"], state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * decay).addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


def muon_optimizer(model, weight_decay: float, learning_rate: float,
                   betas: tuple[float, float]) -> Muon:
    """Muon for a GPT's blocks' weight matrices (names under transformer.h.); AdamW, as
    GPT.configure_optimizers groups it, for the rest: the embeddings (the output head is
    tied to them) decayed, the LayerNorm gains and biases not."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    in_blocks = {name: name.startswith("transformer.h.") for name in params}
    hidden = [p for name, p in params.items() if p.dim() == 2 and in_blocks[name]]
    rest = [p for name, p in params.items() if p.dim() >= 2 and not in_blocks[name]]
    gains = [p for p in params.values() if p.dim() < 2]
    return Muon([{"params": hidden, "weight_decay": weight_decay, "muon": True},
                 {"params": rest, "weight_decay": weight_decay},
                 {"params": gains, "weight_decay": 0.0}], lr=learning_rate, betas=betas)


def pretrain_optimizer(model, name: str, weight_decay: float, learning_rate: float,
                       betas: tuple[float, float], device_type: str):
    """pretrain.py's optimizer by its --optimizer name (bench/train.py times the same one):
    muon (muon_optimizer) or adamw (GPT.configure_optimizers, AdamW throughout)."""
    if name == "muon":
        return muon_optimizer(model, weight_decay, learning_rate, betas)
    if name == "adamw":
        return model.configure_optimizers(weight_decay, learning_rate, betas, device_type)
    raise UserError(f"--optimizer={name}: expected muon or adamw")
