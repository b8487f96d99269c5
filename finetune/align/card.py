"""The model card written beside a recipe adapter, from its ``recipe.json`` record."""

from __future__ import annotations


def adapter_card(record: dict) -> str:
    """A short model card for an adapter folder, written from its ``recipe.json`` record (PEFT's
    ``save_pretrained`` leaves an empty template there)."""
    lines = [
        "---", "library_name: peft", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "license: apache-2.0",
        "tags: [lora, safety-layers]", "---", "",
        "# SmolLM2-135M, refusal-aligned LoRA adapter (safety-layers)", "",
        "A rank-%s LoRA adapter (%s) on SmolLM2-135M-Instruct, the toolkit's `embedded` model; "
        "`embedded-base` is the same weights without it." % (record["settings"]["rank"] * (2 if record["method"] == "sft+dpo" else 1),
                                                            record["method"]),
        "", "Made by `%s` (%.0f s on CPU); every setting, the data hashes and each stage's validation "
        "are in `recipe.json`." % (record["recipe"], record.get("train_seconds") or record["seconds_total"]), "",
        "Knobs were chosen on the validation rows only: %s" % record["selection"], "",
        "| stage | step | paired harmful refused | paired benign answered | borderline answered | score |",
        "|---|---|---|---|---|---|",
    ]
    base = record["validation_base"]
    lines.append(f"| base | - | {base['paired_harmful']} | {base['paired_benign']} | {base['borderline']} | {base['score']} |")
    for name, stage in record["stages"].items():
        for row in stage["validation"]:
            lines.append(f"| {name} | {row['step']} | {row['paired_harmful']} | {row['paired_benign']} | "
                         f"{row['borderline']} | {row['score']} |")
    check = record.get("check")
    if check:
        lines += ["", "Check rows: %d supplementary train pairs held out of training and scored once, after the "
                  "choice (nothing was chosen on them): paired harmful refused %s (95%% CI %s to %s), paired benign "
                  "answered %s (%s to %s)." % (check["pairs"], check["paired_harmful"], *check["paired_harmful_ci95"],
                                               check["paired_benign"], *check["paired_benign_ci95"])]
    lines += ["", "Evaluation on held-out sets (AdvBench test half, paired test pairs, XSTest): "
              "`python -m analyses.safety --model embedded`; the located safety layers of these weights are in "
              "`located.json` beside this card when a location run has been shipped (`analyses.locate --ship`).", ""]
    return "\n".join(lines)
