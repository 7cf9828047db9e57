"""AnomalyGPT: few-shot industrial inspection with a grounded conversational assistant."""
