"""FluoroSAM model: image encoder, text encoder + VQ, SAM prompt encoder and mask decoder."""
from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .config import CONFIGS, FluoroSAMConfig, get_config
from .fluorosam import FluoroSAM
from .text import TextEncoding

__all__ = ["CONFIGS", "FluoroSAM", "FluoroSAMConfig", "TextEncoding", "get_config", "load_checkpoint",
           "read_meta", "save_checkpoint"]
