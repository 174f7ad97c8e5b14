"""difficulty-router runtime: pick the compute tier for each query.

Importing this package is cheap: it pulls in nothing heavier than the standard library.
NumPy, LightGBM and the encoder are imported when a bundle is loaded.

    from router import Router
    r = Router.load("models/router")
    r.route("What is 17 * 23?")          # -> Decision(tier=..., budget=..., samples=..., ...)
    r.route(text, caps=Caps(max_budget=64))   # same as r.route(text, max_budget=64)
"""

from router.bundle import BundleError
from router.caps import Caps
from router.decision import Decision
from router.tiers import Tier

__all__ = ["Router", "Caps", "Decision", "Tier", "BundleError"]
__version__ = "0.1.0"


def __getattr__(name):
    # Router pulls in the policy and bundle code only when asked for
    if name == "Router":
        from router.runtime import Router

        return Router
    raise AttributeError(name)
