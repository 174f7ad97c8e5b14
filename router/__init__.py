"""difficulty-router runtime: pick the compute tier for each query.

Importing this package is cheap: it pulls in nothing heavier than the standard library.
NumPy, LightGBM and the featurizer backends are imported when a bundle is loaded.
"""

from router.tiers import Tier

__all__ = ["Tier"]
__version__ = "0.1.0"
