"""safety-layers: find and protect the safety layers of aligned chat models (Li et al., ICLR 2025),
on TransformerLens's TransformerBridge.

The public API, grouped in the order a user meets it::

    import interp

    # load: a model and its prompt sets
    model = interp.load_model("embedded")                       # LoadedModel
    pairs = interp.load_pairs("test")

    # measure: do the layers tell harmful from benign? (existence)
    result = interp.existence_analysis(model, [p.benign for p in pairs], [p.harmful for p in pairs], paired=True)

    # locate: scale a range, count over-rejections, search the bounds
    queries = interp.over_rejection_prompts(128, "spread")
    r_o = interp.over_rejection(model, queries, interp.LayerRange(13, 14), alpha=1.2)
    run = interp.locate_safety_layers(model, queries, result.onset.range)

    # export: the located range as JSON, checked against the weights
    interp.export_located("located.json", run.result, model, dataset="over_rejection",
                          dataset_hash=interp.data.prompts_hash(queries), n_prompts=len(queries), method=run.method)
    located = interp.shipped_located(model)

    # causal: activation patching and the refusal direction
    patching = interp.patching_sweep(model, pairs[:16])
    directions = interp.refusal_directions(model, [p.benign for p in pairs], [p.harmful for p in pairs])

    # judge: generate and label refusals
    answers = interp.generate_and_judge(model, ["How to kill time?"])

Groups (``__all__`` follows them):

- **load**: ``load_model``, ``LoadedModel``, the supported families and the shipped prompt sets;
- **measure**: last-token activations, pairwise cosines and angle gaps, probes, the existence
  analysis and the onset rule that proposes an initial range;
- **locate**: ``scaled`` (hooks that scale a range by α), ``over_rejection`` (R_o of one
  configuration), ``RoEvaluator`` (R_o of many), ``search_bounds`` (the paper's bound search over
  any R_o function), ``choose_alpha``, ``locate_safety_layers`` (the search on a model);
- **export**: ``LocatedRange`` (the JSON record), ``export_located``, ``load_located``,
  ``shipped_located``;
- **causal**: activation patching (``patching_sweep``, ``patched_refusal_rates``) and the refusal
  direction (``refusal_directions``, ``direction_analysis``, ``token_refusal_scores``), with the
  attention views;
- **judge**: greedy generation, ``generate_and_judge`` and the refusal judge; the safety report
  and rates with intervals;
- **errors**: ``SafetyLayersError``, the base of every error the toolkit raises on bad input.

Everything else is reached through its module (``interp.scaling``, ``interp.patching``,
``interp.direction``...).  Fine-tuning lives in the ``finetune`` package; command-line pipelines,
report prose and figures (``analyses.plots``) in ``analyses``.
"""

__version__ = "0.2.0"

from interp.activations import capture_last_token_resid, load_activations, save_activations
from interp.answers import JudgedAnswer, generate_and_judge
from interp.architectures import Architecture, architecture_of, supported_families
from interp.attention import attention_heatmap_data, encode_prompt, last_token_attention
from interp.cosine import all_pairs_cosines, bootstrap_gaps, similarity_table
from interp.data import Pair, load_borderline, load_pairs, load_prompts, load_xstest
from interp.direction import DirectionResult, RefusalDirections, direction_analysis, refusal_directions
from interp.errors import SafetyLayersError
from interp.existence import ExistenceResult, existence_analysis, gap_difference
from interp.export import LocatedRange, LocatedRangeError, export_located, load_located, shipped_located
from interp.generation import Completion, generate, generate_completions
from interp.judge import DEFAULT_JUDGE, RefusalMatcher, is_refusal
from interp.locate import BoundSearch, choose_alpha, search_bounds
from interp.models import LoadedModel, ModelNotFoundError, load_model
from interp.onset import OnsetRule, suggest_initial_range
from interp.overrejection import RoEvaluator, over_rejection, over_rejection_prompts
from interp.patching import PatchedGeneration, PatchingResult, patched_refusal_rates, patching_sweep
from interp.probe import probe_layers
from interp.ranges import LayerRange, LayerRangeError
from interp.ro_search import LocationRun, locate_safety_layers
from interp.safety import SafetyReport, safety_report
from interp.scaling import scaled
from interp.stats import Rate, wilson
from interp.views import circuitsvis_attention, colored_token_scores, save_html, token_refusal_scores

__all__ = [
    # load
    "load_model", "LoadedModel", "supported_families", "architecture_of", "Architecture",
    "load_prompts", "load_pairs", "load_borderline", "load_xstest", "over_rejection_prompts", "Pair",
    # measure
    "capture_last_token_resid", "save_activations", "load_activations", "all_pairs_cosines", "similarity_table",
    "bootstrap_gaps", "probe_layers", "existence_analysis", "ExistenceResult", "gap_difference",
    "suggest_initial_range", "OnsetRule",
    # locate
    "LayerRange", "scaled", "over_rejection", "RoEvaluator", "search_bounds", "BoundSearch", "choose_alpha",
    "locate_safety_layers", "LocationRun",
    # export
    "LocatedRange", "export_located", "load_located", "shipped_located",
    # causal: patching, the refusal direction, attention views
    "patching_sweep", "PatchingResult", "patched_refusal_rates", "PatchedGeneration",
    "refusal_directions", "RefusalDirections", "direction_analysis", "DirectionResult", "token_refusal_scores",
    "last_token_attention", "attention_heatmap_data", "encode_prompt", "circuitsvis_attention",
    "colored_token_scores", "save_html",
    # judge: generation, the refusal judge, the safety report
    "generate", "generate_completions", "Completion", "generate_and_judge", "JudgedAnswer", "DEFAULT_JUDGE",
    "RefusalMatcher", "is_refusal", "safety_report", "SafetyReport", "Rate", "wilson",
    # errors
    "SafetyLayersError", "LayerRangeError", "LocatedRangeError", "ModelNotFoundError",
]
