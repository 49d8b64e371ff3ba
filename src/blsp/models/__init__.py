"""Models: the frozen speech encoder, the modality adapter, the BLSP model, and model loading.

``hub`` resolves references (aliases of the bundled packages, hub ids, HF folders, CTranslate2
Whisper folders, GGUF files) to ``transformers`` models; ``modeling_blsp`` joins the parts.
"""
