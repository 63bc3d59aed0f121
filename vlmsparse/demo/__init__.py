"""``vlmsparse demo``: the whole pipeline on a small LLaVA trained here, on the synthetic VQA task (layer 7 of
docs/ARCHITECTURE.md; the library never imports this package).

- ``run.py``: the run (train or load the cached model, the prune grid, restoring, tables, report, plots);
- ``pretrain.py``: the plain PyTorch loop that trains the small LLaVA from scratch.

The synthetic task itself (``vlmsparse.data.synthetic``, tokenizer ``vlmsparse.data.vocab``) stays in the library:
it is also the default calibration set and the ``synthetic`` finetuning data.
"""

from __future__ import annotations

from .run import (
    ALLOCATIONS,
    METHODS,
    PATTERNS,
    RESTORE_METHODS,
    DemoConfig,
    default_workdir,
    demo_config,
    load_or_train,
    print_tables,
    run_demo,
    with_budget,
    write_report,
)

__all__ = ["DemoConfig", "demo_config", "default_workdir", "run_demo", "load_or_train", "print_tables",
           "write_report", "with_budget", "METHODS", "PATTERNS", "ALLOCATIONS", "RESTORE_METHODS"]
