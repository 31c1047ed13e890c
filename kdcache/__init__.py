"""kdcache: knowledge distillation with an offline teacher-logit cache.

Three stages that never share a GPU: :func:`dump_teacher` runs the teacher once and writes sparse
distributions to a Zarr cache; :func:`train_student` trains a student from the cache alone;
:func:`evaluate` scores a model. :func:`open_cache` reads a cache.
"""

__version__ = "0.1.0"

from .cache import TeacherCache, open_cache  # noqa: E402
from .config import DumpConfig, EvalConfig, TrainConfig  # noqa: E402
from .errors import KdcacheError  # noqa: E402


def dump_teacher(cfg: DumpConfig) -> dict:
    """Stage 1 (see :func:`kdcache.dump.dump_teacher`)."""
    from .dump import dump_teacher as _run

    return _run(cfg)


def train_student(cfg: TrainConfig) -> dict:
    """Stage 2 (see :func:`kdcache.train.train_student`)."""
    from .train import train_student as _run

    return _run(cfg)


def evaluate(cfg: EvalConfig) -> dict:
    """Stage 3 (see :func:`kdcache.evaluate.evaluate`)."""
    from .evaluate import evaluate as _run

    return _run(cfg)


__all__ = [
    "DumpConfig", "EvalConfig", "KdcacheError", "TeacherCache", "TrainConfig",
    "dump_teacher", "evaluate", "open_cache", "train_student", "__version__",
]
