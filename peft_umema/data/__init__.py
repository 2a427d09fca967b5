"""Data for UMEMA experiments: benchmark loaders, users' own files (tables, CoNLL token files, hub data sets) in the
canonical columns with their schema, and preprocessing (tokenization, k-shot subsets, input corruption)."""

from .loaders import DATA_OPTIONS, LoadedData, describe_data, load_benchmark, load_data
from .schema import IGNORE_INDEX, SEQ_CLS, TOKEN_CLS, DataSchema, schema_of

__all__ = [
    "DATA_OPTIONS",
    "IGNORE_INDEX",
    "SEQ_CLS",
    "TOKEN_CLS",
    "DataSchema",
    "LoadedData",
    "describe_data",
    "load_benchmark",
    "load_data",
    "schema_of",
]
