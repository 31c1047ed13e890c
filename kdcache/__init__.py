"""kdcache: knowledge distillation with an offline teacher-logit cache.

Three stages that never share a GPU: :func:`dump_teacher` runs the teacher once and writes sparse
distributions to a Zarr cache; :func:`train_student` trains a student from the cache alone;
:func:`evaluate` scores a model. :func:`open_cache` reads a cache.
"""

__version__ = "0.1.0"

from .cache import TeacherCache, inspect_cache, open_cache, verify_cache
from .config import DumpConfig, EvalConfig, TrainConfig
from .dump import dump_teacher
from .errors import KdcacheError

# Imported last and bound explicitly: the function `evaluate` must win over the submodule of the same name.
from .evaluate import evaluate
from .train import train_student

__all__ = [
    "DumpConfig",
    "EvalConfig",
    "KdcacheError",
    "TeacherCache",
    "TrainConfig",
    "__version__",
    "dump_teacher",
    "evaluate",
    "inspect_cache",
    "open_cache",
    "train_student",
    "verify_cache",
]
