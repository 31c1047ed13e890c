"""The teacher cache: format (names, dtypes, codecs, version), writer (blocks, resume), reader (streaming)."""

from .format import FORMAT, FORMAT_VERSION
from .reader import Block, TeacherCache, open_cache
from .report import inspect_cache, verify_cache
from .writer import CacheWriter

__all__ = ["FORMAT", "FORMAT_VERSION", "Block", "CacheWriter", "TeacherCache", "inspect_cache", "open_cache", "verify_cache"]
