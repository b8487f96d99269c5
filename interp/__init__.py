"""safety-layers: find and protect the safety layers of aligned chat models (Li et al., ICLR 2025),
on TransformerLens's TransformerBridge.

The public API, in the order data flows (model + prompts -> activations -> statistics -> located
range -> fine-tuning -> evaluation)::

    import interp
    model = interp.load_model("embedded")
    acts = interp.capture_last_token_resid(model, queries)
    result = interp.existence_analysis(model, benign, harmful, paired=True)
    with interp.scaled(model, interp.LayerRange(7, 9), 1.2):
        r_o = interp.count_over_rejection(model, interp.over_rejection_prompts())
    run = interp.locate_layers(model, interp.over_rejection_prompts(), result.onset.range)
    interp.export_located("located.json", run.result, model, ...)

Fine-tuning lives in the ``finetune`` package, command-line pipelines in ``analyses``.
"""

__version__ = "0.2.0"

from interp.activations import capture_last_token_resid, load_activations, save_activations
from interp.architectures import Architecture, architecture_of, supported_families
from interp.attention import attention_heatmap_data, encode_prompt, last_token_attention, plot_attention_heatmap
from interp.cosine import all_pairs_cosines, bootstrap_gaps, similarity_table
from interp.data import Pair, load_borderline, load_pairs, load_prompts, load_xstest
from interp.direction import refusal_directions
from interp.existence import ExistenceResult, existence_analysis, gap_difference
from interp.export import LocatedRange, LocatedRangeError, export_located, load_located, shipped_located
from interp.generation import Completion, generate, generate_completions
from interp.judge import DEFAULT_JUDGE, RefusalMatcher, is_refusal
from interp.locate import LocateResult, choose_alpha, locate
from interp.models import LoadedModel, load_model
from interp.onset import OnsetRule, suggest_initial_range
from interp.overrejection import RoEvaluator, count_over_rejection, over_rejection_at, over_rejection_prompts
from interp.plots import plot_gap, plot_gap_comparison, plot_probe, plot_similarity, plot_sweeps
from interp.probe import probe_layers
from interp.ranges import LayerRange
from interp.ro_search import LocateRun, locate_layers
from interp.safety import SafetyReport, safety_report
from interp.scaling import scale_weights_, scaled, scaling_hooks
from interp.stats import Rate, wilson
from interp.views import (
    circuitsvis_attention,
    colored_token_scores,
    plot_token_scores,
    save_html,
    token_refusal_scores,
)

__all__ = [
    "Architecture", "Completion", "DEFAULT_JUDGE", "ExistenceResult", "LayerRange", "LoadedModel", "LocateResult",
    "LocateRun", "LocatedRange", "LocatedRangeError", "OnsetRule", "Pair", "Rate", "RefusalMatcher", "RoEvaluator",
    "SafetyReport", "all_pairs_cosines", "architecture_of", "attention_heatmap_data", "bootstrap_gaps",
    "capture_last_token_resid", "choose_alpha", "circuitsvis_attention", "colored_token_scores",
    "count_over_rejection", "encode_prompt", "existence_analysis", "export_located", "gap_difference", "generate",
    "generate_completions", "is_refusal", "last_token_attention", "load_activations", "load_borderline",
    "load_located", "load_model", "load_pairs", "load_prompts", "load_xstest", "locate", "locate_layers",
    "over_rejection_at", "over_rejection_prompts", "plot_attention_heatmap", "plot_gap", "plot_gap_comparison",
    "plot_probe", "plot_similarity", "plot_sweeps", "plot_token_scores", "probe_layers", "refusal_directions",
    "safety_report", "save_activations", "save_html", "scale_weights_", "scaled", "scaling_hooks",
    "shipped_located", "similarity_table", "suggest_initial_range", "supported_families", "token_refusal_scores",
    "wilson",
]
