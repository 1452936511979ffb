"""functional_adam: Adam and its family as pure ``init``/``update`` gradient transformations.

Interchangeable with Optax in both directions; see README.md.
"""

import sys

from functional_adam import compat
from functional_adam.compat import conventions
from functional_adam.compat.conventions import Convention
from functional_adam.compat.torch_state import from_torch_state, to_torch_state
from functional_adam.core.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    Schedule,
    Updates,
    apply_updates,
    chain,
    identity,
)
from functional_adam.core.numerics import safe_increment
from functional_adam.kernels.dispatch import update_and_apply
from functional_adam.optimizers.adam import (
    ScaleByAdamState,
    ScaleByAmsgradState,
    adam_leaf,
    scale_by_adam,
    scale_by_amsgrad,
)
from functional_adam.optimizers.adam_8bit import (
    ScaleByAdam8bitState,
    adam_8bit,
    adamw_8bit,
    scale_by_adam_8bit,
)
from functional_adam.optimizers.aliases import adam, adamw, amsgrad, nadam, nadamw
from functional_adam.sharding import (
    StateLeafSharding,
    abstract_state,
    check_state_shardings,
    describe_state_shardings,
    init_sharded,
    state_shardings,
)
from functional_adam.storage.flat import FlatState, flatten
from functional_adam.storage.flat_params import FlatParams, check_layout
from functional_adam.transforms.learning_rate import (
    ScaleByScheduleState,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
)
from functional_adam.transforms.master_weights import MasterWeightsState, with_master_weights
from functional_adam.transforms.nonfinite import SkipNonfiniteState, skip_nonfinite
from functional_adam.transforms.weight_decay import WeightDecaySchedule, add_decayed_weights

# `functional_adam.conventions` stays importable as a module, as before the package had folders.
sys.modules[f"{__name__}.conventions"] = conventions

__version__ = "0.1.0"

__all__ = [
    "Convention",
    "EmptyState",
    "FlatParams",
    "FlatState",
    "GradientTransformation",
    "MasterWeightsState",
    "OptState",
    "Params",
    "ScaleByAdam8bitState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByScheduleState",
    "Schedule",
    "SkipNonfiniteState",
    "StateLeafSharding",
    "Updates",
    "WeightDecaySchedule",
    "abstract_state",
    "adam",
    "adam_8bit",
    "adam_leaf",
    "adamw",
    "adamw_8bit",
    "add_decayed_weights",
    "amsgrad",
    "apply_updates",
    "chain",
    "check_layout",
    "check_state_shardings",
    "compat",
    "conventions",
    "describe_state_shardings",
    "flatten",
    "from_torch_state",
    "identity",
    "init_sharded",
    "nadam",
    "nadamw",
    "safe_increment",
    "scale",
    "scale_by_adam",
    "scale_by_adam_8bit",
    "scale_by_amsgrad",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "skip_nonfinite",
    "state_shardings",
    "to_torch_state",
    "update_and_apply",
    "with_master_weights",
]
