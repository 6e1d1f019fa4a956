"""SARCLIP training: caption tables (``captions``, ``caption_sources``), one chip reading for the
CLIP image tower (``images``), the contrastive loop (``train``, ``config``, ``sarmae_tower``) and
zero-shot / retrieval evaluation (``evaluate``). The model, its package and its input contract
are the engine's (``engine.clip``); DESIGN.md, "Data flow: CLIP training"."""
