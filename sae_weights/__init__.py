"""Sparse autoencoder weights: modules, on-disk layouts, sources (local / hub / builtin), catalogs."""

from .catalog import CatalogError, FeatureCatalog, FeatureEntry
from .layouts import SAELENS, SPARSIFY, SAEFormatError, detect_layout, load_directory, read_config, save_sae
from .sae import SAEConfig, SparseAutoencoder, random_topk_sae
from .source import BUILTIN_RANDOM_TOPK, SAESourceError, load_sae, resolve_directory

__all__ = [
    "BUILTIN_RANDOM_TOPK",
    "SAELENS",
    "SPARSIFY",
    "CatalogError",
    "FeatureCatalog",
    "FeatureEntry",
    "SAEConfig",
    "SAEFormatError",
    "SAESourceError",
    "SparseAutoencoder",
    "detect_layout",
    "load_directory",
    "load_sae",
    "random_topk_sae",
    "read_config",
    "resolve_directory",
    "save_sae",
]
