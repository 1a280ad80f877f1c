"""Names that several modules share, defined once: the 2023 metric keys, the option group that decides how
a prompt is written, and the files a run and a study leave. Plain values and no imports, so pure modules
(the study report) and heavy ones (training) read the same names without pulling each other in.

    from tunelab.names import METRIC_KEYS, PLAN_FILE, results_file
    results_file("predict")  # "predict_results.json"
"""

# The 2023 scores (tunelab.metrics computes them), in table order, with the short column label of each.
METRIC_LABELS = {"bleu-4": "B-4", "rouge-1": "R-1", "rouge-2": "R-2", "rouge-l": "R-L"}
METRIC_KEYS = tuple(METRIC_LABELS)

# Options that decide how a prompt is written. A checkpoint's run decides them for eval, chat and export
# unless given again; a study's eval stages take them from their row's training config; the tokenized-data
# cache is keyed by them.
PROMPT_OPTIONS = ("template", "source_prefix", "max_source_length", "identity_name", "identity_author")

# The embedded default model (tunelab/model.py) is this model of the Hugging Face Hub.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# ---- files of a run directory (tunelab train / eval / predict)
PREDICTIONS_FILE = "generated_predictions.jsonl"  # one JSON object per generated eval sample (predict)
LIKELIHOOD_FILE = "likelihood.jsonl"  # one JSON object per eval sample: index, tokens, nll, kl (eval, predict)
TRAINABLE_FILE = "trainable.json"  # what the method trains (parameter counts, module names)
TRAINER_STATE_FILE = "trainer_state.json"  # HF Trainer's log history
PREFIX_WEIGHTS = "prefix_encoder.safetensors"  # a P-Tuning v2 checkpoint's trained prefix (tunelab/prefix.py)


def results_file(stage: str) -> str:
    """The results file a stage (train, eval, predict) writes last: `{stage}_results.json`."""
    return f"{stage}_results.json"


# ---- files of a study directory (tunelab study; layout in tunelab/study/runner.py)
SPEC_FILE = "spec.yaml"  # the spec as given
PLAN_FILE = "plan.json"  # the expanded plan the report reads
ROW_FILE = "row.json"  # one row's status, error and timings
