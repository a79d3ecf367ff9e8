"""Student rerankers: one interface (``Student.score_pairs``) over cross-encoders, TWOLAR LM scorers and R2R."""
