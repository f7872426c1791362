"""Number formats: frozen data, looked up by name.

>>> import lowbit_jax as lb
>>> lb.formats.get("mxfp4").block_size
32
"""
from lowbit_jax.formats._formats import (FLOAT_SPECIALS, SCALE_DTYPES, BlockFormat,
                                         FloatFormat, Format, IntFormat, LookupFormat)
from lowbit_jax.formats._registry import get, names, register

__all__ = ["Format", "IntFormat", "FloatFormat", "LookupFormat", "BlockFormat",
           "FLOAT_SPECIALS", "SCALE_DTYPES", "get", "names", "register"]
