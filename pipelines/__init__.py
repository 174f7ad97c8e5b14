"""difficulty-router pipeline: prepare -> rollout -> label -> featurize -> train -> evaluate -> export.

Each stage is a module with a thin ``main()``; nothing heavy is imported here.
"""

STAGES = ("prepare", "rollout", "label", "featurize", "train", "evaluate", "export")
# feedback-loop commands (``python -m pipelines TOOL``): not DVC stages (yet); each takes its own options
TOOLS = ("feedback", "ope", "drift", "recalibrate", "promote")
