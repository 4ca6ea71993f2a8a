"""Caption -> question-answer synthesis for radiology VQA: ``rules`` (certain answers from concepts and caption
patterns) and ``llm`` (a chat LLM rewriting captions, validated against them); both write JSONL records that
the ``rocov2_vqa`` adapter reads."""
