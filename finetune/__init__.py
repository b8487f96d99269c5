"""Fine-tuning with gradient masks (SPPFT), the fine-tuning sets, evaluation, the protection
study and the alignment recipe.  The public API::

    from finetune import TrainConfig, train, freeze_layers, build_set, benign_pairs, evaluate
"""

from finetune.data import benign_pairs, build_set, implicit_set, normal_set
from finetune.evaluate import EvalResult, evaluate
from finetune.masks import freeze_elements, freeze_layers, head_mask, named_parameters, neuron_mask, resolve_range
from finetune.train import TrainConfig, TrainResult, train

__all__ = [
    "EvalResult", "TrainConfig", "TrainResult", "benign_pairs", "build_set", "evaluate", "freeze_elements",
    "freeze_layers", "head_mask", "implicit_set", "named_parameters", "neuron_mask", "normal_set", "resolve_range",
    "train",
]
