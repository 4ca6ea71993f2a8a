"""Evaluation: retrieval R@k, zero-shot modality/concept classification, TGIT, modality gap; JSON + plots."""
from fuselip_med.eval.embedding import Embedder, EmbeddingTable, EmbedItem, embed_items
from fuselip_med.eval.retrieval import evaluate_retrieval
from fuselip_med.eval.runner import TASKS, run_evaluation
from fuselip_med.eval.similarity import rank_targets

__all__ = ["TASKS", "run_evaluation", "EmbedItem", "Embedder", "EmbeddingTable", "embed_items",
           "evaluate_retrieval", "rank_targets"]
