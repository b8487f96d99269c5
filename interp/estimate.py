"""The first-step refusal estimate, and how well it agrees with generated R_o.

A refusal shows in its first token: refusals open with a small set of tokens ("I" of "I'm
sorry", "Sorry", "As" of "As an AI").  ``refusal_opening_token_ids`` collects the first token of
every refusal phrase that can open an answer, as this model's tokenizer splits it.  For each
prompt, ``FirstStep`` holds the probability mass the next-token distribution at the last prompt
position puts on those tokens (``mass``) and whether the greedy first token is one of them
(``argmax_opens``).  The summed mass is a smooth estimate of R_o and the count of argmax flags a
hard one.  Both over-count ("I" also opens "I'd be happy to ..."), so their agreement with
generated R_o is *measured* (``agreement``: Pearson r across configurations, per-prompt
agreement), not assumed.  ``interp.overrejection.RoEvaluator`` computes it (alone, from the
prefill, or for free beside generation).  ``refusal_log_odds`` is the same quantity as a smooth
score per prompt (activation patching and importance scores use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.judge import REFUSAL_PHRASES


def refusal_opening_token_ids(tokenizer, phrases=REFUSAL_PHRASES) -> list[int]:
    """The first token of each phrase that can open an answer (starts with a capital letter),
    as ``tokenizer`` splits it at the start of a response (no leading space)."""
    ids = set()
    for phrase in phrases:
        phrase = phrase.strip()
        if not phrase or not phrase[0].isupper():
            continue  # "cannot help with" only ever appears mid-sentence
        tokens = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if tokens:
            ids.add(int(tokens[0]))
    if not ids:
        raise ValueError("no refusal phrase can open an answer (none starts with a capital letter)")
    return sorted(ids)


@dataclass
class FirstStep:
    """First-step refusal statistics of one configuration, per prompt (caller's order)."""

    mass: Float[Tensor, " prompt"]  # probability on refusal-opening tokens, in [0, 1]
    argmax_opens: Bool[Tensor, " prompt"]  # the greedy first token opens a refusal

    @classmethod
    def from_logits(cls, logits: Float[Tensor, "prompt vocab"], opener_ids: Tensor) -> "FirstStep":
        logits = logits.float()
        mass = logits.softmax(-1)[:, opener_ids.to(logits.device)].sum(-1).clamp(0.0, 1.0)
        argmax_opens = torch.isin(logits.argmax(-1), opener_ids.to(logits.device))
        return cls(mass.cpu(), argmax_opens.cpu())

    @property
    def expected(self) -> float:
        """Smooth R_o estimate: the summed opener mass."""
        return float(self.mass.sum())

    @property
    def count(self) -> int:
        """Hard R_o estimate: prompts whose greedy first token opens a refusal."""
        return int(self.argmax_opens.sum())

    def upper_bound(self, threshold: float, margin: int = 0) -> int:
        """Prompts whose opener mass reaches ``threshold``, plus ``margin``: a bound on generated
        R_o when no prompt below the threshold refuses more than ``margin`` times (measured)."""
        return int((self.mass >= threshold).sum()) + margin


def refusal_log_odds(logits: Float[Tensor, "batch vocab"], opener_ids) -> Float[Tensor, " batch"]:
    """``log p_open - log(1 - p_open)`` of each row, ``p_open`` the softmax mass on
    ``opener_ids`` (computed as a difference of two log-sum-exps)."""
    logits = logits.float()
    is_open = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    is_open[torch.as_tensor(opener_ids, device=logits.device)] = True
    if is_open.all():
        raise ValueError("every token opens a refusal; the log-odds are undefined")
    return logits[..., is_open].logsumexp(-1) - logits[..., ~is_open].logsumexp(-1)


def pearson(a, b) -> float | None:
    """Pearson correlation, ``None`` when undefined (fewer than 2 values or no spread)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
