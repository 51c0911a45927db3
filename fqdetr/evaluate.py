"""COCO evaluation (the name DESIGN.md uses); the code lives in ``fqdetr.evaluation``."""
from fqdetr.evaluation import *  # noqa: F401,F403
from fqdetr.evaluation import __all__  # noqa: F401
