"""The arithmetic of `rtnq eval`: sums over scored positions, and the figures made from them.

Every figure is a mean over the same positions, accumulated chunk by chunk in float64 so the order
of chunks and windows does not move the result:
  perplexity      exp(mean negative log-likelihood of the next token), for source and candidate
  kl              mean KL(source || candidate) = sum_v p_s(v) (log p_s(v) - log p_c(v)), in nats
  top1_agreement  share of positions where both models' most likely token is the same
  top1_accuracy   share of positions where the candidate's most likely token is the next token
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Sums:
    positions: int = 0
    nll_source: float = 0.0
    nll_candidate: float = 0.0
    kl: float = 0.0
    agree: int = 0
    correct_source: int = 0
    correct_candidate: int = 0

    def add(self, logp_source: torch.Tensor, logp_candidate: torch.Tensor, targets: torch.Tensor) -> None:
        """One chunk: (P, V) log-probabilities of both models and the (P,) next tokens."""
        t = targets.unsqueeze(-1)
        self.positions += targets.numel()
        self.nll_source -= logp_source.gather(-1, t).double().sum().item()
        self.nll_candidate -= logp_candidate.gather(-1, t).double().sum().item()
        self.kl += kl_sum(logp_source, logp_candidate)
        top_s, top_c = logp_source.argmax(-1), logp_candidate.argmax(-1)
        self.agree += int((top_s == top_c).sum())
        self.correct_source += int((top_s == targets).sum())
        self.correct_candidate += int((top_c == targets).sum())

    def figures(self) -> dict:
        n = self.positions
        if n == 0:
            raise ValueError("no scored positions")
        return {
            "source": {"perplexity": math.exp(self.nll_source / n), "nll": self.nll_source / n,
                       "top1_accuracy": self.correct_source / n},
            "candidate": {"perplexity": math.exp(self.nll_candidate / n), "nll": self.nll_candidate / n,
                          "top1_accuracy": self.correct_candidate / n},
            # KL is >= 0; a sum of rounded terms can land a hair below it when the models are equal.
            "kl": max(self.kl / n, 0.0),
            "top1_agreement": self.agree / n,
            "tokens_scored": n,
        }


def kl_sum(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """sum over positions of KL(p || q) for (P, V) log-probabilities; p = 0 terms count 0, not NaN."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=logp.dtype))
    return terms.double().sum().item()


def log_probs(logits: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """float32 log-softmax over the vocabulary, after the model's logit soft-capping if it has one."""
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)
