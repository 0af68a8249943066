"""The ground floor every stage stands on: records, model loading, generation, oracles, JSONL, errors."""
