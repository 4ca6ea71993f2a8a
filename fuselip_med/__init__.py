"""fuselip_med: FuseLIP early-fusion multimodal embeddings for medical imaging."""
from fuselip_med.core.checkpoints import load_model, save_pretrained
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.late_fusion import LateFusion, LateFusionConfig
from fuselip_med.core.text_tokenizer import TextTokenizer
from fuselip_med.core.titok import TiTokTokenizer
from fuselip_med.data.schema import Sample

__version__ = "0.1.0"
__all__ = ["load_model", "save_pretrained", "FuseLIP", "FuseLIPConfig", "LateFusion", "LateFusionConfig",
           "TextTokenizer", "TiTokTokenizer", "Sample"]
