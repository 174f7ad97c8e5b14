"""difficulty-router pipeline: prepare -> rollout -> label -> featurize -> train -> evaluate -> export.

Each stage is a module with a thin ``main()``; nothing heavy is imported here.
"""

STAGES = ("prepare", "rollout", "label", "featurize", "train", "evaluate", "export")
