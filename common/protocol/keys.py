"""Every key that crosses the site boundary, spelled once: message types, record names, config keys
and metric keys. Code on either side names these constants, never the strings
(``tests/test_protocol.py`` holds the site side and ``common/`` to that).
"""

from __future__ import annotations

# ------------------------------------------------------------------ message types and actions
# Flower routes a message by ``<category>`` or ``<category>.<action>`` (its ``message_type``;
# ``"train"`` is ``"train.default"``). dicomfl's actions name the method: a site picks its
# algorithm by (category, action), never by which keys a config happens to hold.
TRAIN = "train"
EVALUATE = "evaluate"
QUERY = "query"
CATEGORIES = (TRAIN, EVALUATE, QUERY)
DEFAULT = "default"
PERSONALIZE = "personalize"  # train.personalize: fine-tune the final global model (once, after the last round)
FEDSTATS = "fedstats"  # query.fedstats: the federated feature statistics (once, before round 1)
ACTIONS = {TRAIN: (DEFAULT, PERSONALIZE), EVALUATE: (DEFAULT,), QUERY: (FEDSTATS,)}

# ------------------------------------------------------------------------------ record names
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
LOCAL_ARRAYS = "local-arrays"
LOCAL_METRICS = "local-metrics"
CONTROL = "scaffold-control"  # train message: SCAFFOLD's server control c
CONTROL_DELTA = "scaffold-delta"  # train reply: SCAFFOLD's delta_c_i
PERSONAL_ARRAYS = "personal-arrays"  # personalize reply: the personalized model (site's opt-in)
PERSONAL_METRICS = "personal-metrics"  # personalize reply: numbers of the fine-tuning
SITE = "site"
SITE_NAME = "name"  # the one key of the ``site`` ConfigRecord
MODEL_PREFIX = "model."
EVAL_PREFIX = "metrics."
STATS = "stats"

# ------------------------------------------------------------------------- config keys
RUN = "run"
DEFAULT_RUN = "run"  # the run name of a message that names none
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
LOCAL_EPOCHS = "local-epochs"
LOCAL_STEPS = "local-steps"
PROXIMAL_MU = "proximal-mu"
DP = "dp"
TARGET_EPSILON = "target-epsilon"  # also a train metric: the run's target as the site applied it
DELTA = "delta"  # also a train metric
SEED = "seed"
LR_SCALE = "lr-scale"
LOCAL_NORM = "local-norm"
MODEL = "model"  # the run's model description (JSON of ModelConfig)
# the run's global standardization: one number per numeric feature of the schema, in schema order
FEATURE_MEAN = "feature-mean"
FEATURE_STD = "feature-std"
PERSONALIZE_STEPS = "personalize-steps"
PERSONALIZE_LR_SCALE = "personalize-lr-scale"
PERSONALIZE_CHECKS = "personalize-checks"
REPLICATES_REQUEST = "replicates"  # evaluate message: how many replicate AUROCs the coordinator asks for
PERSONAL = "personal"  # evaluate message: also evaluate the site's own personalized model

# ------------------------------------------------------------------------- metric keys
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
STEPS = "steps"
TRAIN_SECONDS = "train-seconds"
DECLINED = "declined"
EPSILON = "epsilon"
NOISE_MULTIPLIER = "noise-multiplier"
EPSILON_IF_TRAINED = "epsilon-if-trained"
EPSILON_IF_RELEASED = "epsilon-if-released"
# what a site's evaluation returns (dicomfl.common.train.evaluate) and the evaluate reply carries
N = "n"
THRESHOLD = "threshold"
PREVALENCE = "prevalence"
AUROC = "auroc"
AUROC_LO = "auroc_lo"
AUROC_HI = "auroc_hi"
AUPRC = "auprc"
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced_accuracy"
SENSITIVITY = "sensitivity"
SPECIFICITY = "specificity"
BRIER = "brier"
ECE = "ece"
LOSS = "loss"
AUROC_REPLICATES = "auroc-boot"
AUROC_REPLICATES_ID = "auroc-boot-id"
# a model's numbers on the site's validation split, sent as ``val-<key>``
VAL_PREFIX = "val-"
VAL_REPORTED = (AUROC, LOSS, BALANCED_ACCURACY, NUM_EXAMPLES)  # in a train or personalize reply
VAL_AUROC, VAL_LOSS = VAL_PREFIX + AUROC, VAL_PREFIX + LOSS
VAL_BALANCED_ACCURACY, VAL_NUM_EXAMPLES = VAL_PREFIX + BALANCED_ACCURACY, VAL_PREFIX + NUM_EXAMPLES


def val_key(key: str) -> str:
    """The key of a validation-split number in a reply (``val-<key>``)."""
    return VAL_PREFIX + key


TRAIN_METRICS = frozenset({
    NUM_EXAMPLES, TRAIN_LOSS, STEPS, TRAIN_SECONDS, DECLINED, EPSILON, DELTA, NOISE_MULTIPLIER,
    TARGET_EPSILON, EPSILON_IF_TRAINED,
    # the incoming global model on the site's validation split, measured before training
    VAL_AUROC, VAL_LOSS, VAL_BALANCED_ACCURACY, VAL_NUM_EXAMPLES,
})
EVAL_METRICS = frozenset({
    NUM_EXAMPLES, N, THRESHOLD, PREVALENCE, AUROC, AUROC_LO, AUROC_HI, AUPRC, ACCURACY,
    BALANCED_ACCURACY, SENSITIVITY, SPECIFICITY, BRIER, ECE, LOSS,
    # the same model on the site's validation split (model selection, never the test split)
    VAL_AUROC, VAL_LOSS,
    AUROC_REPLICATES, AUROC_REPLICATES_ID,  # replicate AUROCs: only when the site allows them
})
STATS_EXTRA = frozenset({NUM_EXAMPLES, DECLINED, EPSILON, NOISE_MULTIPLIER, EPSILON_IF_RELEASED})
LIST_METRICS = frozenset({AUROC_REPLICATES})  # the only list-valued metrics on the wire

#: Every config key a coordinator may send (the site refuses nothing for an unknown key, it only
#: never reads one).
CONFIG_KEYS = frozenset({
    RUN, SERVER_ROUND, NUM_ROUNDS, LOCAL_EPOCHS, LOCAL_STEPS, PROXIMAL_MU, DP, TARGET_EPSILON, DELTA, SEED, LR_SCALE,
    LOCAL_NORM, MODEL, FEATURE_MEAN, FEATURE_STD, PERSONALIZE_STEPS, PERSONALIZE_LR_SCALE, PERSONALIZE_CHECKS,
    REPLICATES_REQUEST, PERSONAL,
})
RECORD_NAMES = frozenset({ARRAYS, METRICS, CONFIG, LOCAL_ARRAYS, LOCAL_METRICS, CONTROL, CONTROL_DELTA,
                          PERSONAL_ARRAYS, PERSONAL_METRICS, SITE, STATS})
