"""Training: the recipe (``_config``), the loop (``_loop``), optimiser and schedule (``_optim``),
losses (``_losses``), validation (``_validation``), post-processing tuned on the validation
images (``_tune``), time budgets and automatic tiles (``_budget``), checkpoints and exact
resumption (``_checkpoint``), distributed runs (``_distributed``) and logs (``_logs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from biounet._exports import lazy_exports

#: public name -> the private module that defines it (imported on first use)
_EXPORTS: dict[str, str] = {
    "AUTO_TILE_MAX": "_budget",
    "AUTO_TILE_MEMORY_SHARE": "_budget",
    "recompute_batch_norm": "_batch_norm",
    "BUDGET_PROBE_STEPS": "_budget",
    "auto_tile": "_budget",
    "largest_tile_within": "_budget",
    "plan_steps": "_budget",
    "CHECKPOINT": "_checkpoint",
    "RESUMABLE_CHANGES": "_checkpoint",
    "read_run_config": "_checkpoint",
    "run_config": "_checkpoint",
    "BestBy": "_config",
    "ClassBalance": "_config",
    "Color": "_config",
    "Optimizer": "_config",
    "Precision": "_config",
    "Schedule": "_config",
    "TrainConfig": "_config",
    "rank_device": "_distributed",
    "CsvLog": "_logs",
    "EventWriter": "_logs",
    "plot_curves": "_logs",
    "Status": "_loop",
    "train": "_loop",
    "train_steps": "_loop",
    "loss_weights": "_losses",
    "soft_dice_loss": "_losses",
    "weighted_cross_entropy": "_losses",
    "lr_factor": "_optim",
    "make_optimizer": "_optim",
    "SEED_OPTIONS": "_tune",
    "THRESHOLDS": "_tune",
    "TunedPostprocess": "_tune",
    "postprocess_grid": "_tune",
    "tune_postprocess": "_tune",
    "VALIDATION_SCORES": "_validation",
    "evaluate_samples": "_validation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from biounet.training._batch_norm import recompute_batch_norm  # noqa: F401
    from biounet.training._budget import (  # noqa: F401
        AUTO_TILE_MAX,
        AUTO_TILE_MEMORY_SHARE,
        BUDGET_PROBE_STEPS,
        auto_tile,
        largest_tile_within,
        plan_steps,
    )
    from biounet.training._checkpoint import (  # noqa: F401
        CHECKPOINT,
        RESUMABLE_CHANGES,
        read_run_config,
        run_config,
    )
    from biounet.training._config import (  # noqa: F401
        BestBy,
        ClassBalance,
        Color,
        Optimizer,
        Precision,
        Schedule,
        TrainConfig,
    )
    from biounet.training._distributed import rank_device  # noqa: F401
    from biounet.training._logs import CsvLog, EventWriter, plot_curves  # noqa: F401
    from biounet.training._loop import Status, train, train_steps  # noqa: F401
    from biounet.training._losses import loss_weights, soft_dice_loss, weighted_cross_entropy  # noqa: F401
    from biounet.training._optim import lr_factor, make_optimizer  # noqa: F401
    from biounet.training._tune import (  # noqa: F401
        SEED_OPTIONS,
        THRESHOLDS,
        TunedPostprocess,
        postprocess_grid,
        tune_postprocess,
    )
    from biounet.training._validation import VALIDATION_SCORES, evaluate_samples  # noqa: F401
