"""What both HTTP apps, the API (`api/`) and the inference server (`inference/`), share of FastAPI. It imports
neither of them, nor torch, so each may use it without breaking the other's import rules."""
