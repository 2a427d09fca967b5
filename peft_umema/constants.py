"""Names and values shared across the package, defined once. A leaf module: it imports nothing of ours."""

# the label id that transformers' losses and data collators skip (padding, non-first sub-tokens)
IGNORE_INDEX = -100

# peft task types UMEMA supports
SEQ_CLS = "SEQ_CLS"
TOKEN_CLS = "TOKEN_CLS"
SUPPORTED_TASK_TYPES = (SEQ_CLS, TOKEN_CLS)

# the tag of tokens outside every entity in BIO tagging
OUTSIDE_TAG = "O"

# attribute names of the classification head in transformers' *ForSequenceClassification / *ForTokenClassification
HEAD_MODULE_NAMES = ("score", "classifier")

# per-prediction fields a UMEMA model adds to its outputs (per example for SEQ_CLS, per token for TOKEN_CLS)
UNCERTAINTY_OUTPUT_FIELDS = ("confidence", "aleatoric", "epistemic", "temperature")
