"""Generate, then judge: the one function every experiment uses to ask "did the model refuse?".

``generate_and_judge(model, queries, ...)`` runs ``interp.generation.generate_completions``
(greedy, batched, with any hooks the caller passes or has attached) and labels each answer with
a refusal judge (``interp.judge``).  R_o, R_h, the safety report, the alignment recipe's
validation, patching and the refusal direction's interventions all call it, so a change of judge
or of decoding reaches every figure at once.

``early_stop=True`` (the default) stops each answer as soon as the judge's binary verdict can no
longer change (``judge.decided``): the verdict ``refused`` equals full generation's (tested), but
the text is cut, so ``label`` may read ``full_refusal`` where the whole answer would be a partial
refusal.  Use ``early_stop=False`` when the text or the three-class label matters (the safety
report).
"""

from __future__ import annotations

from dataclasses import dataclass

from interp.generation import generate_completions
from interp.judge import DEFAULT_JUDGE


@dataclass(frozen=True)
class JudgedAnswer:
    """One query's greedy answer and its judge's label (``compliance``, ``full_refusal`` or
    ``partial_refusal``); ``refused`` is the binary rule (not compliance)."""

    query: str
    text: str
    label: str
    stop: str

    @property
    def refused(self) -> bool:
        return self.label != "compliance"


def generate_and_judge(
    model,
    queries: list[str],
    *,
    judge=DEFAULT_JUDGE,
    max_new_tokens: int = 32,
    early_stop: bool = True,
    **generate_kwargs,
) -> list[JudgedAnswer]:
    """Greedy answers to ``queries`` (``generate_completions``'s keyword arguments pass through:
    ``batch_size``, ``template``, ``fwd_hooks``, ``prompts``, ``progress``, ``desc``...), each
    labelled by ``judge``; one ``JudgedAnswer`` per query, in order."""
    decided = judge.decided if early_stop else None
    completions = generate_completions(model, queries, max_new_tokens=max_new_tokens, decided=decided,
                                       **generate_kwargs)
    return [JudgedAnswer(q, c.text, judge.classify(c.text), c.stop) for q, c in zip(queries, completions)]


def refused_flags(answers: list[JudgedAnswer]) -> list[bool]:
    """Each answer's binary verdict."""
    return [a.refused for a in answers]


__all__ = ["JudgedAnswer", "generate_and_judge", "refused_flags"]
