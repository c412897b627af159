from recbole_llm.trainer.llm_trainer import LLMTrainer

__all__ = ["LLMTrainer"]
