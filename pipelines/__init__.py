"""difficulty-router pipeline: prepare -> rollout -> label -> featurize -> train -> evaluate -> export,
then the production loop: feedback -> drift -> recalibrate / retrain -> ope.

Each stage is a module with a thin ``main()``; nothing heavy is imported here.
"""

STAGES = ("prepare", "rollout", "label", "featurize", "train", "evaluate", "export")
# the production loop's DVC stages (after export): they read the inbox production/ and run on no
# traffic too (an empty feedback table, no drift, the exported bundle passed through)
LOOP_STAGES = ("feedback", "drift", "recalibrate", "retrain", "ope")
DVC_STAGES = STAGES + LOOP_STAGES
# feedback-loop commands (``python -m pipelines TOOL``): each takes its own options
TOOLS = ("feedback", "ope", "drift", "recalibrate", "retrain", "promote")
