"""Project scripts; the wheel factory is scripts.factory (python3 -m scripts.factory)."""
