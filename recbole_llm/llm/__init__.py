from recbole_llm.llm.backbone import LoraSpec, backbone_from_config, load_backbone

__all__ = ["LoraSpec", "backbone_from_config", "load_backbone"]
