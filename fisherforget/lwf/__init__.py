"""Learning With Forgetting (LWF): unlearn self-knowledge that conflicts with a fine-tuning task.

1. :func:`generate_self_knowledge`: the model answers the forgetting task's prompts (``D_self``);
   :func:`encode_pairs` makes training samples of the answers.
2. :func:`forgetting_confidence`: the paper's forgetting confidence of each sample, from the
   learning task's Fisher weighting the sample's intended update (``docs/lwf.md``), and the other
   scorers (``loss_change``, ``fisher_alignment``, ``fisher_overlap``), all from one backward pass
   per batch, layer by layer; :func:`control_scores` gives every ranking, including the random /
   reversed controls.
3. :class:`UnlearningSchedule` and :func:`select`: every ``every`` learning steps, ``steps``
   unlearning steps through ``FisherAdamW.unlearning``, each ascending on the top ``fraction`` of
   ``D_self`` and descending on a retain set (default: the rest of ``D_self``); or, interleaved,
   the same objective with a negative weight inside every learning step.

Two ways in: :class:`LearningWithForgetting` (any training loop) and :class:`LWFTrainer` /
:class:`LWFCallback` (``transformers.Trainer``; imported lazily so that ``transformers`` stays
optional).
"""

from fisherforget.lwf.confidence import (
    SCORE_KINDS,
    SCORE_METHODS,
    ForgettingScores,
    control_scores,
    forgetting_confidence,
    mean_gradient,
    optimizer_direction,
    optimizer_fisher,
    score_terms,
    swapped_weights,
)
from fisherforget.lwf.loop import RETAIN_SETS, LearningWithForgetting, LWFConfig
from fisherforget.lwf.schedule import UnlearningSchedule, select
from fisherforget.lwf.self_knowledge import (
    batches_of,
    collate,
    encode_pairs,
    fingerprint,
    generate_self_knowledge,
    normalized_match,
    pad_id_of,
)

__all__ = [
    "SCORE_KINDS", "SCORE_METHODS", "RETAIN_SETS", "ForgettingScores", "control_scores",
    "swapped_weights",
    "forgetting_confidence", "mean_gradient",
    "optimizer_direction", "optimizer_fisher", "score_terms", "LearningWithForgetting",
    "LWFConfig", "UnlearningSchedule", "select", "batches_of", "collate", "encode_pairs",
    "fingerprint", "generate_self_knowledge", "normalized_match", "pad_id_of", "LWFCallback",
    "LWFTrainer",
]


def __getattr__(name):
    if name in ("LWFCallback", "LWFTrainer"):
        from fisherforget.lwf import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'fisherforget.lwf' has no attribute {name!r}")
